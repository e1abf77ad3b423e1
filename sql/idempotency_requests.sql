CREATE TABLE IF NOT EXISTS "idempotency_requests" (
  key text PRIMARY KEY,
  state text NOT NULL CHECK (state IN ('processing', 'completed', 'halted')),
  fingerprint text NOT NULL,
  owner text,
  expires_at timestamptz NOT NULL,
  lease_expires_at timestamptz,
  status_code smallint,
  headers jsonb,
  body bytea,
  created_at timestamptz NOT NULL DEFAULT now(),
  identity text,
  waited boolean NOT NULL DEFAULT false
);
ALTER TABLE "idempotency_requests" ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now(), ADD COLUMN IF NOT EXISTS identity text,
  ADD COLUMN IF NOT EXISTS waited boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS "idempotency_requests_expires_at" ON "idempotency_requests" (expires_at);
CREATE INDEX IF NOT EXISTS "idempotency_requests_lease_expires_at" ON "idempotency_requests" (lease_expires_at) WHERE state = 'processing';
CREATE INDEX IF NOT EXISTS "idempotency_requests_unfinished" ON "idempotency_requests" (created_at, key) WHERE state <> 'completed';

CREATE TABLE IF NOT EXISTS "idempotency_requests" (
  key text PRIMARY KEY,
  state text NOT NULL CHECK (state IN ('processing', 'completed', 'halted')),
  fingerprint text NOT NULL,
  owner text,
  expires_at timestamptz NOT NULL,
  lease_expires_at timestamptz,
  status_code smallint,
  headers jsonb,
  body bytea
);
CREATE INDEX IF NOT EXISTS "idempotency_requests_expires_at" ON "idempotency_requests" (expires_at);
CREATE INDEX IF NOT EXISTS "idempotency_requests_lease_expires_at" ON "idempotency_requests" (lease_expires_at) WHERE state = 'processing';

import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import t from 'tap'
import pg from 'pg'
import { InvalidOptionError, PostgresStore, POSTGRES_SCHEMA, postgresSchema, type IdempotencyStore } from '../../lib/index.js'
import { runConformance } from './conformance.js'
import { requirePostgres, startPostgres, type PostgresServer } from '../helpers/postgres-server.js'
import { sleep } from '../helpers/timing.js'

t.test('ships the table as SQL: exported, as a file, and printed by the CLI', async (t) => {
  t.match(POSTGRES_SCHEMA, /CREATE TABLE IF NOT EXISTS "idempotency_requests" \(\n {2}key text PRIMARY KEY,/)
  t.match(POSTGRES_SCHEMA, /CREATE INDEX IF NOT EXISTS "idempotency_requests_expires_at" ON "idempotency_requests" \(expires_at\);/)
  t.match(POSTGRES_SCHEMA, /ON "idempotency_requests" \(lease_expires_at\) WHERE state = 'processing';/)
  t.equal(readFileSync(new URL('../../sql/idempotency_requests.sql', import.meta.url), 'utf8'), POSTGRES_SCHEMA, 'the file matches')
  const bin = new URL('../../dist/bin.js', import.meta.url).pathname
  const cli = spawnSync(process.execPath, [bin, 'sql'], { encoding: 'utf8' })
  t.equal(cli.status, 0)
  t.equal(cli.stdout, POSTGRES_SCHEMA, 'npx fastify-idempotency sql prints it')
  const named = spawnSync(process.execPath, [bin, 'sql', 'billing.requests'], { encoding: 'utf8' })
  t.equal(named.stdout, postgresSchema('billing.requests'))
  t.match(named.stdout, /CREATE TABLE IF NOT EXISTS "billing"."requests"/)
  const usage = spawnSync(process.execPath, [bin], { encoding: 'utf8' })
  t.equal(usage.status, 2)
  t.match(usage.stderr, /^usage: fastify-idempotency <command> \[flags\]\n/)
  t.match(usage.stderr, /\n {2}sql \[table\] {3}print the SQL of the PostgreSQL store's table\n/)
})

t.test('PostgresStore rejects bad options, naming them', async (t) => {
  const pool = { query: async () => ({ rows: [], rowCount: 0 }) }
  t.throws(() => new PostgresStore({ pool: {} as never }), { message: /pool must be a pg Pool/ })
  t.throws(() => new PostgresStore({ pool, table: 'drop table x;' }), InvalidOptionError)
  t.throws(() => new PostgresStore({ pool, table: 'a;b' }), { message: /table must be a table name, optionally schema-qualified/ })
  t.throws(() => new PostgresStore({ pool, pruneBatchSize: 0 }), { message: /pruneBatchSize must be >= 1/ })
})

if (requirePostgres(t)) {
  let server: PostgresServer
  let admin: pg.Pool
  t.before(async () => {
    server = await startPostgres()
    admin = new pg.Pool({ connectionString: server.connectionString })
    await admin.query(POSTGRES_SCHEMA)
  })
  t.teardown(async () => {
    await admin.end()
    await server.destroy()
  })

  const pools = new WeakMap<IdempotencyStore, pg.Pool>()
  runConformance(t, {
    name: 'postgres',
    create: async () => {
      const pool = new pg.Pool({ connectionString: server.connectionString, max: 4 })
      const store = new PostgresStore({ pool })
      pools.set(store, pool)
      return store
    },
    now: () => Date.now(),
    advance: sleep,
    destroy: async (store) => { await pools.get(store)?.end() },
    pruneCount: 'at-least'
  })

  t.test('creates its table and indexes when asked', async (t) => {
    const pool = new pg.Pool({ connectionString: server.connectionString })
    t.teardown(() => pool.end())
    await pool.query('CREATE SCHEMA IF NOT EXISTS created')
    const store = new PostgresStore({ pool, table: 'created.requests', createTable: true })
    t.same(await store.insert('k', { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 60_000, lease: 1000, takeOverExpiredLease: false }), { inserted: true })
    const indexes = await pool.query("SELECT indexname FROM pg_indexes WHERE schemaname = 'created' AND tablename = 'requests' ORDER BY indexname")
    t.same(indexes.rows.map((row: { indexname: string }) => row.indexname), ['created_requests_expires_at', 'created_requests_lease_expires_at', 'created_requests_unfinished', 'requests_pkey'])
    const columns = await pool.query("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'created' AND table_name = 'requests' ORDER BY ordinal_position")
    t.same(columns.rows.map((row: { column_name: string, data_type: string }) => `${row.column_name} ${row.data_type}`), [
      'key text', 'state text', 'fingerprint text', 'owner text', 'expires_at timestamp with time zone',
      'lease_expires_at timestamp with time zone', 'status_code smallint', 'headers jsonb', 'body bytea',
      'created_at timestamp with time zone', 'identity text', 'waited boolean'
    ])
  })

  t.test('adds the columns operators and waiters use to a table made by an earlier schema, keeping its rows', async (t) => {
    const pool = new pg.Pool({ connectionString: server.connectionString })
    t.teardown(() => pool.end())
    await pool.query('CREATE SCHEMA IF NOT EXISTS upgraded')
    await pool.query(`CREATE TABLE upgraded.requests (key text PRIMARY KEY, state text NOT NULL, fingerprint text NOT NULL, owner text,
      expires_at timestamptz NOT NULL, lease_expires_at timestamptz, status_code smallint, headers jsonb, body bytea)`)
    await pool.query("INSERT INTO upgraded.requests (key, state, fingerprint, expires_at) VALUES ('old', 'halted', 'f', now() + interval '1 hour')")
    const store = new PostgresStore({ pool, table: 'upgraded.requests', createTable: true })
    const listed = await store.list({ limit: 10 })
    t.strictSame(listed.records.map((entry) => [entry.key, entry.state, entry.identity, typeof entry.createdAt]), [['old', 'halted', undefined, 'number']])
    t.equal(listed.cursor, undefined)
    const waited = await pool.query("SELECT waited FROM upgraded.requests WHERE key = 'old'")
    t.strictSame(waited.rows, [{ waited: false }], 'an old row is not waited for')
  })

  t.test('sees a row committed by another transaction while its insert waited on it', async (t) => {
    const pool = new pg.Pool({ connectionString: server.connectionString })
    t.teardown(() => pool.end())
    const store = new PostgresStore({ pool, timeout: 5000 })
    const other = await admin.connect()
    t.teardown(() => other.release())
    const key = `raced-${Date.now()}`
    await other.query('BEGIN')
    await other.query(`INSERT INTO idempotency_requests (key, state, fingerprint, owner, expires_at, lease_expires_at)
      VALUES ($1, 'processing', 'f', 'other', now() + interval '1 minute', now() + interval '1 minute')`, [key])
    // this insert's statement snapshot is taken before the other transaction commits
    const pending = store.insert(key, { fingerprint: 'f', owner: 'mine', expiresAt: Date.now() + 60_000, lease: 60_000, takeOverExpiredLease: false })
    await sleep(100)
    await other.query('COMMIT')
    const result = await pending
    t.equal(result.inserted, false, 'the other transaction won')
    t.equal(result.inserted ? undefined : result.record.state, 'processing')
  })

  t.test('tries to create its table again after a failed attempt', async (t) => {
    const pool = new pg.Pool({ connectionString: server.connectionString })
    t.teardown(() => pool.end())
    await pool.query('DROP SCHEMA IF EXISTS later CASCADE')
    const store = new PostgresStore({ pool, table: 'later.requests', createTable: true })
    const record = { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 60_000, lease: 1000, takeOverExpiredLease: false }
    const error = await store.insert('k', record).then(() => undefined, (failure: unknown) => failure as Error)
    t.match(error?.message, /schema "later" does not exist/)
    await pool.query('CREATE SCHEMA later')
    t.same(await store.insert('k', record), { inserted: true })
  })

  t.test('stores headers as jsonb and the body as bytea, readable with SQL', async (t) => {
    const pool = new pg.Pool({ connectionString: server.connectionString })
    t.teardown(() => pool.end())
    const store = new PostgresStore({ pool })
    const key = `sql-${Date.now()}`
    await store.insert(key, { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 60_000, lease: 1000, takeOverExpiredLease: false })
    await store.update(key, 'o', { state: 'completed', expiresAt: Date.now() + 60_000, response: { statusCode: 201, headers: { 'x-a': 'b', link: ['1', '2'] }, body: Buffer.from([0, 1, 255]) } })
    const row = await admin.query('SELECT state, owner, status_code, headers, body, lease_expires_at FROM idempotency_requests WHERE key = $1', [key])
    t.same(row.rows[0], { state: 'completed', owner: null, status_code: 201, headers: { 'x-a': 'b', link: ['1', '2'] }, body: Buffer.from([0, 1, 255]), lease_expires_at: null })
  })

  t.test('prunes 100 000 expired rows in batches while tracked requests keep being served', async (t) => {
    const pool = new pg.Pool({ connectionString: server.connectionString, max: 4 })
    t.teardown(() => pool.end())
    await pool.query('CREATE TABLE IF NOT EXISTS prune_test (LIKE idempotency_requests INCLUDING ALL)')
    await pool.query(`INSERT INTO prune_test (key, state, fingerprint, expires_at)
      SELECT 'expired-' || n, 'completed', 'f', now() - interval '1 minute' FROM generate_series(1, 100000) AS n`)
    const store = new PostgresStore({ pool, table: 'prune_test', pruneBatchSize: 5000, timeout: 5000 })
    const state = { pruning: true }
    const pruned = store.prune().finally(() => { state.pruning = false })
    let served = 0
    let slowest = 0
    while (state.pruning) {
      const started = Date.now()
      const result = await store.insert(`live-${served}`, { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 60_000, lease: 1000, takeOverExpiredLease: false })
      slowest = Math.max(slowest, Date.now() - started)
      t.same(result, { inserted: true })
      served++
    }
    t.equal(await pruned, 100_000, 'every expired row was removed')
    t.ok(served >= 5, `served ${served} tracked requests during the prune`)
    t.ok(slowest < 1000, `the slowest took ${slowest} ms`)
    const left = await pool.query("SELECT count(*)::int AS n FROM prune_test WHERE key LIKE 'expired-%'")
    t.equal(left.rows[0].n, 0)
    t.equal((await pool.query("SELECT count(*)::int AS n FROM prune_test WHERE key LIKE 'live-%'")).rows[0].n, served, 'live rows stay')
  })

  t.test('fails a statement that takes longer than the timeout, and undoes a late insert', async (t) => {
    const pool = new pg.Pool({ connectionString: server.connectionString, max: 2 })
    t.teardown(() => pool.end())
    const store = new PostgresStore({ pool, timeout: 100 })
    const blocker = await admin.connect()
    t.teardown(() => blocker.release())
    const key = `late-${Date.now()}`
    // hold the table in a lock the insert has to wait for
    await blocker.query('BEGIN')
    await blocker.query('LOCK TABLE idempotency_requests IN EXCLUSIVE MODE')
    const error = await store.insert(key, { fingerprint: 'f', owner: 'late-owner', expiresAt: Date.now() + 60_000, lease: 60_000, takeOverExpiredLease: false })
      .then(() => undefined, (failure: unknown) => failure as Error)
    t.equal(error?.message, 'postgres insert timed out after 100 ms')
    await sleep(100)
    await blocker.query('COMMIT')
    await sleep(200)
    t.equal(await store.lookup(key), undefined, 'the late insert was deleted once it committed')
  })
}

import Type from 'typebox'
import { compileOptions, withDefault } from '../options-validator.js'
import { withTimeout } from './timeout.js'
import { identityJson, parseIdentityJson, type RequestIdentity } from '../key.js'
import { Watchers } from './watchers.js'
import type {
  IdempotencyRecord,
  IdempotencyStore,
  InsertResult,
  ListedRecord,
  ListPage,
  ListQuery,
  NewRecord,
  RecordState,
  RecordUpdate,
  StoredResponse
} from './store.js'

/** A query as the store sends it: pg's query config. */
export interface PostgresQuery {
  text: string
  values: unknown[]
  name?: string
}

/**
 * What the store needs of a pg `Pool` (e.g. `app.pg.pool` of @fastify/postgres): described by
 * its shape, so that the types do not depend on pg being installed.
 */
export interface PostgresPool {
  query (query: PostgresQuery): Promise<{ rows: any[], rowCount: number | null }>
  /**
   * pg's `Pool` has both: `watch` opens its own connection with them, to LISTEN (a pooled one
   * would be reaped when idle). Without them, waiters look on their own.
   */
  readonly Client?: new (options: any) => ListenClient
  readonly options?: unknown
}

/** What `watch` needs of the connection it opens: a pg `Client`. */
export interface ListenClient {
  connect (): Promise<unknown>
  query (text: string): Promise<unknown>
  on (event: 'notification', listener: (message: { channel: string, payload?: string | undefined }) => void): unknown
  on (event: 'error' | 'end', listener: () => void): unknown
  end (): Promise<unknown>
}

/** The table's SQL, for the user's own migrations; `PostgresStore` runs it with `createTable: true`. */
export function postgresSchema (table = 'idempotency_requests'): string {
  const name = quoteIdentifier(table)
  const bare = table.replace(/[^A-Za-z0-9_]/g, '_')
  return `CREATE TABLE IF NOT EXISTS ${name} (
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
ALTER TABLE ${name} ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now(), ADD COLUMN IF NOT EXISTS identity text,
  ADD COLUMN IF NOT EXISTS waited boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS ${quoteIdentifier(`${bare}_expires_at`)} ON ${name} (expires_at);
CREATE INDEX IF NOT EXISTS ${quoteIdentifier(`${bare}_lease_expires_at`)} ON ${name} (lease_expires_at) WHERE state = 'processing';
CREATE INDEX IF NOT EXISTS ${quoteIdentifier(`${bare}_unfinished`)} ON ${name} (created_at, key) WHERE state <> 'completed';
`
}

/** The schema for the default table name. */
export const POSTGRES_SCHEMA = postgresSchema()

const PostgresStoreOptionsSchema = Type.Object({
  pool: Type.Unsafe<PostgresPool>(Type.Object({ query: Type.Function([], Type.Any()) }, {
    description: 'a pg Pool (an object with query)'
  })),
  table: Type.Optional(withDefault(Type.String({ pattern: '^[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)?$', description: 'a table name, optionally schema-qualified' }), 'idempotency_requests')),
  createTable: Type.Optional(withDefault(Type.Boolean(), false)),
  timeout: Type.Optional(withDefault(Type.Integer({ minimum: 1 }), 1000)),
  pruneBatchSize: Type.Optional(withDefault(Type.Integer({ minimum: 1 }), 1000))
}, { additionalProperties: false })

export interface PostgresStoreOptions {
  /** The pool; the store never ends it. */
  pool: PostgresPool
  /** The table, optionally schema-qualified. Default `idempotency_requests`. */
  table?: string
  /** Create the table and its indexes if they do not exist, on first use. Default `false`. */
  createTable?: boolean
  /** ms a statement may take before it fails (and the request gets 503). Default 1000. */
  timeout?: number
  /** Rows one prune statement deletes at most. Default 1000. */
  pruneBatchSize?: number
}

const INSERTED: InsertResult = Object.freeze({ inserted: true })
// ms before a lost LISTEN connection is opened again, while duplicates wait.
const RECONNECT_DELAY = 1000
const ignore = (): void => {}
const TOOK_OVER: InsertResult = Object.freeze({ inserted: true, tookOver: true })
const validateOptions = compileOptions(PostgresStoreOptionsSchema, { subject: 'PostgresStore', prefix: '' })

interface RecordRow {
  inserted: boolean
  took_over?: boolean
  state: RecordState | null
  fingerprint: string | null
  expires_ms: number | null
  lease_expired: boolean | null
  status_code: number | null
  headers: StoredResponse['headers'] | null
  body: Buffer | null
  lease_ms?: number | null
  created_ms?: number | null
  /** JSON text, not jsonb: JSON escapes lone surrogates, which jsonb refuses and a scope may hold. */
  identity?: string | null
  key?: string
  created_text?: string
}

/**
 * Keeps records in a PostgreSQL table beside the app's own data, shared by every instance.
 * Track is one statement (an `INSERT … ON CONFLICT` that also returns the existing record),
 * completing is one; leases are judged by the database's clock, `now()`.
 *
 * @example
 * await app.register(fastifyPostgres, { connectionString: process.env.DATABASE_URL })
 * await app.register(idempotency, { store: new PostgresStore({ pool: app.pg.pool }) })
 */
export class PostgresStore implements IdempotencyStore {
  readonly name = 'postgres'
  readonly table: string
  readonly timeout: number
  readonly pruneBatchSize: number
  #pool: PostgresPool
  #ready: Promise<void> | undefined
  #sql: ReturnType<typeof statements>
  // Who waits for which key's record: the store's LISTEN connection for them, opened on first use.
  #watchers = new Watchers()
  #listener: ListenClient | undefined
  #listening: Promise<void> | undefined
  #reconnect: NodeJS.Timeout | undefined
  #closed = false

  constructor (options: PostgresStoreOptions) {
    const settings = validateOptions(options)
    this.table = settings.table
    this.timeout = settings.timeout
    this.pruneBatchSize = settings.pruneBatchSize
    this.#pool = settings.pool
    this.#sql = statements(settings.table)
    this.#ready = settings.createTable ? undefined : Promise.resolve()
  }

  async insert (key: string, record: NewRecord): Promise<InsertResult> {
    const values = [key, record.fingerprint, record.owner, record.expiresAt, record.lease, record.takeOverExpiredLease, record.createdAt ?? null, record.identity === undefined ? null : identityJson(record.identity)]
    // A row committed by another transaction after this statement's snapshot was taken is not
    // seen by the statement's SELECT, though its INSERT conflicted with it: then nothing comes
    // back, and the statement runs again with a new snapshot.
    for (;;) {
      const rows = await this.#query('insert', { name: this.#sql.names.insert, text: this.#sql.insert, values }, (late) => {
        // The insert may still commit after the timeout: undo it then, so that a request that
        // got 503 holds no key.
        late.then((result) => {
          if ((result.rows[0] as RecordRow | undefined)?.inserted === true) this.delete(key, record.owner).catch(() => {})
        }, () => {})
      })
      const row = rows[0] as RecordRow | undefined
      if (row === undefined) continue
      if (row.inserted) return row.took_over === true ? TOOK_OVER : INSERTED
      return { inserted: false, record: toRecord(row) }
    }
  }

  async lookup (key: string): Promise<IdempotencyRecord | undefined> {
    const rows = await this.#query('lookup', { name: this.#sql.names.lookup, text: this.#sql.lookup, values: [key] })
    if (rows.length === 0) return undefined
    const row = rows[0] as RecordRow
    const record = toRecord(row)
    if (row.lease_ms !== null && row.lease_ms !== undefined) record.leaseExpiresAt = row.lease_ms
    if (record.state !== 'completed' && row.created_ms !== null && row.created_ms !== undefined) record.createdAt = row.created_ms
    if (row.identity !== null && row.identity !== undefined) record.identity = parseIdentityJson<RequestIdentity>(row.identity)
    return record
  }

  async remove (key: string): Promise<boolean> {
    return (await this.#query('remove', { name: this.#sql.names.remove, text: this.#sql.remove, values: [key] })).length === 1
  }

  /** By the index of unfinished records, oldest first; the cursor is the last record's creation time and key. */
  async list (query: ListQuery): Promise<ListPage> {
    const [createdAt = null, after = ''] = query.cursor === undefined ? [] : JSON.parse(query.cursor) as [string, string]
    const values = [query.state ?? null, createdAt, after, query.limit + 1]
    const rows = await this.#query('list', { name: this.#sql.names.list, text: this.#sql.list, values }) as RecordRow[]
    const records: ListedRecord[] = rows.slice(0, query.limit).map((row) => ({
      key: row.key as string,
      state: row.state as ListedRecord['state'],
      leaseExpired: row.lease_expired === true,
      expiresAt: row.expires_ms as number,
      createdAt: row.created_ms as number,
      identity: row.identity === null || row.identity === undefined ? undefined : parseIdentityJson<RequestIdentity>(row.identity)
    }))
    const last = rows[query.limit - 1]
    return { records, cursor: rows.length > query.limit && last !== undefined ? JSON.stringify([last.created_text, last.key]) : undefined }
  }

  async update (key: string, owner: string, update: RecordUpdate): Promise<boolean> {
    let query: PostgresQuery
    if (update.state === 'processing') {
      query = { name: this.#sql.names.renew, text: this.#sql.renew, values: [key, owner, update.lease] }
    } else if (update.state === 'halted') {
      query = { name: this.#sql.names.halt, text: this.#sql.halt, values: [key, owner, update.expiresAt] }
    } else {
      const { statusCode, headers, body } = update.response
      // bytea takes a Buffer: pg would read a string as bytea's text escape format.
      const bytes = typeof body === 'string' ? Buffer.from(body) : body
      query = { name: this.#sql.names.complete, text: this.#sql.complete, values: [key, owner, update.expiresAt, statusCode, headers, bytes] }
    }
    return (await this.#query('update', query)).length === 1
  }

  async delete (key: string, owner: string): Promise<boolean> {
    return (await this.#query('delete', { name: this.#sql.names.delete, text: this.#sql.delete, values: [key, owner] })).length === 1
  }

  /**
   * Tells `listener` when the record under `key` completes, halts or is deleted: the store's
   * connection LISTENs, then the record is marked, so that its end NOTIFYs; then the listener is
   * told once, since the end may have come before the mark. A lost connection is opened again,
   * and then every listener is told, as notifications may have been lost meanwhile.
   */
  watch (key: string, listener: () => void): () => void {
    if (this.#pool.Client === undefined || this.#closed) return ignore
    return this.#watchers.add(key, listener, (tell) => {
      this.#listen().then(() => this.#mark([key])).then(tell, ignore)
    }, () => {
      // Nobody waits: a lost connection is opened again by the next watch.
      if (this.#watchers.size === 0) clearTimeout(this.#reconnect)
    })
  }

  /** Closes the connection `watch` opened; the pool passed in stays open. */
  async close (): Promise<void> {
    this.#closed = true
    clearTimeout(this.#reconnect)
    this.#watchers.clear()
    const listener = this.#listener
    this.#listener = undefined
    await listener?.end().catch(ignore)
  }

  #listen (): Promise<void> {
    this.#listening ??= this.#connect()
    return this.#listening
  }

  async #connect (): Promise<void> {
    const Client = this.#pool.Client as NonNullable<PostgresPool['Client']>
    const listener = new Client(this.#pool.options)
    this.#listener = listener
    listener.on('notification', (message) => {
      if (message.payload !== undefined) this.#watchers.tell(message.payload)
    })
    // A failed connection ends: 'end' follows.
    listener.on('error', ignore)
    listener.on('end', () => { this.#lost(listener) })
    try {
      await withTimeout(listener.connect().then(() => listener.query(`LISTEN "${postgresChannel(this.table)}"`)),
        this.timeout, `postgres listen timed out after ${this.timeout} ms`)
    } catch (error) {
      listener.end().catch(ignore)
      this.#lost(listener)
      throw error
    }
  }

  // Once per connection: the next watch, or the retry while some wait, opens another.
  #lost (listener: ListenClient): void {
    if (this.#listener !== listener) return
    this.#listener = undefined
    this.#listening = undefined
    // One retry at a time: a timer left behind would open a connection after close().
    clearTimeout(this.#reconnect)
    if (this.#closed || this.#watchers.size === 0) return
    this.#reconnect = setTimeout(() => {
      // Marks a record a lost connection could not, then has every waiter look again.
      this.#listen().then(() => this.#mark(this.#watchers.keys())).then(() => {
        this.#watchers.tellAll()
      }, ignore)
    }, RECONNECT_DELAY).unref()
  }

  async #mark (keys: string[]): Promise<void> {
    await this.#query('watch', { name: this.#sql.names.mark, text: this.#sql.mark, values: [keys] })
  }

  /**
   * Deletes expired rows in batches of `pruneBatchSize`, each its own short statement that skips
   * rows other transactions hold, so a prune never locks the table for long.
   */
  async prune (): Promise<number> {
    let removed = 0
    for (;;) {
      const rows = await this.#query('prune', { name: this.#sql.names.prune, text: this.#sql.prune, values: [this.pruneBatchSize] })
      removed += rows.length
      if (rows.length < this.pruneBatchSize) return removed
    }
  }

  async #query (operation: string, query: PostgresQuery, onTimeout?: (late: Promise<{ rows: unknown[] }>) => void): Promise<unknown[]> {
    this.#ready ??= this.#pool.query({ text: postgresSchema(this.table), values: [] }).then(() => {}, (error: unknown) => {
      this.#ready = undefined
      throw error
    })
    const sent = this.#ready.then(() => this.#pool.query(query))
    const message = `postgres ${operation} timed out after ${this.timeout} ms`
    return (await withTimeout(sent, this.timeout, message, onTimeout === undefined ? undefined : () => { onTimeout(sent) })).rows
  }
}

/** The channel a store NOTIFYs on: one per table, an identifier of at most 63 bytes. */
export function postgresChannel (table: string): string {
  return `idempotency_${table.replace(/[^A-Za-z0-9_]/g, '_')}`.slice(0, 63)
}

function statements (tableName: string) {
  const table = quoteIdentifier(tableName)
  // The end of a record a duplicate waits for is told at commit, its key as the payload. A NOTIFY
  // serializes committing transactions on a lock: only a record a waiter marked pays it.
  const told = (rows: string) => `SELECT CASE WHEN waited THEN pg_notify('${postgresChannel(tableName)}', key) END FROM ${rows}`
  const name = (statement: string) => `idempotency-${statement}:${tableName}`
  const record = `state, fingerprint, (extract(epoch FROM expires_at) * 1000)::float8 AS expires_ms,
    (state = 'processing' AND lease_expires_at <= now()) AS lease_expired, status_code, headers, body`
  const origin = `(extract(epoch FROM lease_expires_at) * 1000)::float8 AS lease_ms,
    (extract(epoch FROM created_at) * 1000)::float8 AS created_ms, identity`
  return {
    names: {
      insert: name('insert'),
      lookup: name('lookup'),
      renew: name('renew'),
      halt: name('halt'),
      complete: name('complete'),
      delete: name('delete'),
      prune: name('prune'),
      remove: name('remove'),
      list: name('list'),
      mark: name('mark')
    },
    // A live row is read without a write or a lock, so a replay costs one read; only when there
    // is none does the INSERT run, whose conflict check keeps two instances from both inserting.
    insert: `WITH existing AS (
  SELECT ${record} FROM ${table}
  WHERE key = $1 AND expires_at > now()
    AND NOT ($6::boolean AND state = 'processing' AND lease_expires_at <= now() AND fingerprint = $2)
), attempt AS (
  INSERT INTO ${table} AS r (key, state, fingerprint, owner, expires_at, lease_expires_at, created_at, identity)
  SELECT $1, 'processing', $2, $3, to_timestamp($4::float8 / 1000), now() + $5::float8 * interval '1 millisecond',
    coalesce(to_timestamp($7::float8 / 1000), now()), $8::text
  WHERE NOT EXISTS (SELECT 1 FROM existing)
  ON CONFLICT (key) DO UPDATE SET
    state = 'processing', fingerprint = EXCLUDED.fingerprint, owner = EXCLUDED.owner,
    expires_at = EXCLUDED.expires_at, lease_expires_at = EXCLUDED.lease_expires_at,
    status_code = NULL, headers = NULL, body = NULL, created_at = EXCLUDED.created_at, identity = EXCLUDED.identity,
    -- Who waited for a lapsed record waits for the one taking it over.
    waited = r.waited AND r.expires_at > now()
  WHERE r.expires_at <= now()
    OR ($6::boolean AND r.state = 'processing' AND r.lease_expires_at <= now() AND r.fingerprint = EXCLUDED.fingerprint)
  RETURNING 1
), lapsed AS (
  -- Read in the statement's snapshot, before the insert: a live record whose lease lapsed is taken over.
  SELECT 1 FROM ${table} WHERE key = $1 AND expires_at > now() AND state = 'processing' AND lease_expires_at <= now()
)
SELECT true AS inserted, EXISTS (SELECT 1 FROM lapsed) AS took_over, NULL AS state, NULL AS fingerprint, NULL::float8 AS expires_ms, NULL::boolean AS lease_expired,
  NULL::smallint AS status_code, NULL::jsonb AS headers, NULL::bytea AS body
FROM attempt
UNION ALL
SELECT false, false, * FROM existing`,
    lookup: `SELECT false AS inserted, ${record}, ${origin} FROM ${table} WHERE key = $1 AND expires_at > now()`,
    remove: `WITH gone AS (DELETE FROM ${table} WHERE key = $1 AND expires_at > now()
  AND NOT (state = 'processing' AND lease_expires_at > now()) RETURNING key, waited) ${told('gone')}`,
    mark: `UPDATE ${table} SET waited = true WHERE key = ANY($1::text[]) AND state = 'processing' AND NOT waited`,
    // $1: 'halted', 'lapsed' or NULL for both; ($2, $3): where the previous page ended.
    // The cursor's time is in microseconds since the epoch: exact (extract gives a numeric from
    // PostgreSQL 14), and free of the session's DateStyle and time zone.
    list: `SELECT key, (extract(epoch FROM created_at) * 1000000)::bigint::text AS created_text, ${record}, ${origin} FROM ${table}
WHERE state <> 'completed' AND expires_at > now()
  AND (CASE WHEN state = 'halted' THEN $1::text IS DISTINCT FROM 'lapsed' ELSE $1::text IS DISTINCT FROM 'halted' AND lease_expires_at <= now() END)
  AND ($2::bigint IS NULL OR (created_at, key) > (timestamptz 'epoch' + $2::bigint * interval '1 microsecond', $3::text))
ORDER BY created_at, key LIMIT $4`,
    renew: `UPDATE ${table} SET lease_expires_at = now() + $3::float8 * interval '1 millisecond',
  expires_at = greatest(expires_at, now() + $3::float8 * interval '1 millisecond')
WHERE key = $1 AND owner = $2 AND state = 'processing' AND expires_at > now() RETURNING 1`,
    halt: `WITH done AS (UPDATE ${table} SET state = 'halted', expires_at = to_timestamp($3::float8 / 1000), owner = NULL, lease_expires_at = NULL
WHERE key = $1 AND owner = $2 AND state = 'processing' AND expires_at > now() RETURNING key, waited) ${told('done')}`,
    complete: `WITH done AS (UPDATE ${table} SET state = 'completed', expires_at = to_timestamp($3::float8 / 1000), owner = NULL,
  lease_expires_at = NULL, status_code = $4, headers = $5, body = $6, identity = NULL
WHERE key = $1 AND owner = $2 AND state = 'processing' AND expires_at > now() RETURNING key, waited) ${told('done')}`,
    delete: `WITH gone AS (DELETE FROM ${table} WHERE key = $1 AND owner = $2 AND state = 'processing' AND expires_at > now()
  RETURNING key, waited) ${told('gone')}`,
    prune: `DELETE FROM ${table} WHERE key IN (
  SELECT key FROM ${table} WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED
) RETURNING 1`
  }
}

function toRecord (row: RecordRow): IdempotencyRecord {
  const state = row.state as RecordState
  return {
    state,
    fingerprint: row.fingerprint as string,
    expiresAt: row.expires_ms as number,
    leaseExpired: row.lease_expired === true,
    response: state === 'completed'
      ? { statusCode: row.status_code as number, headers: row.headers as StoredResponse['headers'], body: row.body as Buffer }
      : undefined
  }
}

function quoteIdentifier (name: string): string {
  return name.split('.').map((part) => `"${part}"`).join('.')
}

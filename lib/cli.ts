// The operator's tool behind `npx fastify-idempotency`: the PostgreSQL table's SQL, and find,
// forget and list of the records in a Redis or PostgreSQL store. bin.ts runs it; tests call
// `main` in this process.
import { parseArgs } from 'node:util'
import { RequestTracker, type TrackerLogger } from './tracker.js'
import { identityJson, type RequestIdentity } from './key.js'
import type { IdempotencyStore, ListedRecord, ListQuery } from './stores/store.js'
import { PostgresStore, postgresSchema } from './stores/postgres.js'
import { RedisStore } from './stores/redis.js'
import { withTimeout } from './stores/timeout.js'

/** Where `main` writes, and how it loads the optional peer dependencies (ioredis, pg). */
export interface CliIo {
  stdout: { write (text: string): unknown }
  stderr: { write (text: string): unknown }
  /** `import(name)` unless given: tests give one that fails, as when the package is missing. */
  load?: ((name: string) => Promise<unknown>) | undefined
}

export const USAGE = `usage: fastify-idempotency <command> [flags]

commands:
  sql [table]   print the SQL of the PostgreSQL store's table
  find          print the live record of one request, as JSON
  forget        remove the record of one request, so that its retry runs the handler again
  list          list the records that wait for a decision: halted ones, and running ones whose lease lapsed

store (find, forget, list):
  --redis URL     a redis:// or rediss:// URL, or
  --postgres URL  a postgres:// or postgresql:// URL
  --prefix P      the Redis store's key prefix (default idem:)
  --table T       the PostgreSQL store's table (default idempotency_requests)
  --timeout MS    for connecting and for each call (default 5000)
request (find, forget):
  --method M --route R --key K   the method, the route as declared (prefix included), the client's key
  --param NAME=VALUE             a route parameter, as in request.params (once for each)
  --constraint NAME=VALUE        a route constraint as declared, e.g. host=a.example.com, or a
                                 pattern as /source/flags, e.g. host=/^api\\./i (once for each)
  --scope S                      what the route's scope function returned, if it has one
list:
  --state halted|lapsed   only those (default both)
  --limit N               records per page (default 100); --cursor C gives the next page
  --json                  one JSON object per record and line, instead of a table

exit codes: 0 done, 1 no live record, 2 usage error, 3 store unreachable or failed
`

const EXIT_OK = 0
const EXIT_NOT_FOUND = 1
const EXIT_USAGE = 2
const EXIT_STORE = 3
const DEFAULT_TIMEOUT = 5000
const DEFAULT_LIMIT = 100
const NOT_FOUND = 'no live record for that request\n'
// The names PostgresStore accepts: postgresSchema quotes a name but does not escape it.
const TABLE_NAME = /^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$/

const HELP = { help: { type: 'boolean', short: 'h' } } as const
const STORE_FLAGS = {
  ...HELP,
  redis: { type: 'string' },
  postgres: { type: 'string' },
  prefix: { type: 'string' },
  table: { type: 'string' },
  timeout: { type: 'string' }
} as const
const IDENTITY_FLAGS = {
  ...STORE_FLAGS,
  method: { type: 'string' },
  route: { type: 'string' },
  param: { type: 'string', multiple: true },
  constraint: { type: 'string', multiple: true },
  key: { type: 'string' },
  scope: { type: 'string' }
} as const
const LIST_FLAGS = {
  ...STORE_FLAGS,
  state: { type: 'string' },
  limit: { type: 'string' },
  cursor: { type: 'string' },
  json: { type: 'boolean' }
} as const

/** A mistake in the command line: exit 2. */
class UsageError extends Error {}
/** A store that cannot be reached, or whose call failed: exit 3. */
class StoreError extends Error {}

interface StoreSettings {
  kind: 'redis' | 'postgres'
  url: string
  /** The URL without its credentials or query, as messages show it. */
  shown: string
  prefix: string | undefined
  table: string | undefined
  timeout: number
}

interface OpenStore {
  store: IdempotencyStore
  close: () => Promise<void>
}

type Values = Record<string, string | boolean | string[] | undefined>

/**
 * Runs the command line `argv` (without node and the script) and answers its exit code: 0 done,
 * 1 no live record, 2 usage error, 3 store unreachable or failed.
 *
 * @example
 * process.exitCode = await main(process.argv.slice(2), process)
 */
export async function main (argv: string[], io: CliIo): Promise<number> {
  try {
    return await run(argv, io)
  } catch (error) {
    if (error instanceof UsageError) {
      io.stderr.write(`fastify-idempotency: ${error.message}\n(fastify-idempotency --help shows the usage)\n`)
      return EXIT_USAGE
    }
    io.stderr.write(`fastify-idempotency: ${(error as Error).message}\n`)
    return EXIT_STORE
  }
}

async function run (argv: string[], io: CliIo): Promise<number> {
  if (asksForHelp(argv)) {
    io.stdout.write(USAGE)
    return EXIT_OK
  }
  const [command, ...rest] = argv
  if (command === undefined) {
    io.stderr.write(USAGE)
    return EXIT_USAGE
  }
  if (command === 'sql') return sql(rest, io)
  if (command !== 'find' && command !== 'forget' && command !== 'list') throw new UsageError(`unknown command ${JSON.stringify(command)}`)
  const values = parse(rest, command === 'list' ? LIST_FLAGS : IDENTITY_FLAGS)
  const settings = storeSettings(values)
  // Everything is read before the store is opened: a usage error never waits on a connection.
  const identity = command === 'list' ? undefined : identityOf(values)
  const query = command === 'list' ? listQuery(values) : undefined
  const { store, close } = settings.kind === 'redis' ? await openRedis(settings, io) : await openPostgres(settings, io)
  const tracker = new RequestTracker(store, { logger: jsonLogger(io), cacheTtl: 86_400_000, processingTtl: 60_000, releaseOnError: false })
  let code: number
  try {
    if (query !== undefined) code = await list(tracker, query, values.json === true, io)
    else code = command === 'find' ? await find(tracker, identity as RequestIdentity, io) : await forget(tracker, identity as RequestIdentity, io)
  } catch (error) {
    throw new StoreError(`${settings.kind} ${command} failed at ${settings.shown}: ${(error as Error).message}`)
  } finally {
    await close()
  }
  return code
}

// Read leniently, so that `--help` counts wherever it is, but not as the value of another flag.
function asksForHelp (argv: string[]): boolean {
  const { tokens } = parseArgs({ args: argv, options: { ...IDENTITY_FLAGS, ...LIST_FLAGS }, strict: false, allowPositionals: true, tokens: true })
  return tokens.some((token) => token.kind === 'option' && token.name === 'help')
}

function parse (args: string[], options: typeof IDENTITY_FLAGS | typeof LIST_FLAGS): Values {
  try {
    return parseArgs({ args, options, strict: true, allowPositionals: false }).values as Values
  } catch (error) {
    throw new UsageError((error as Error).message)
  }
}

function sql (args: string[], io: CliIo): number {
  let positionals: string[]
  try {
    positionals = parseArgs({ args, options: HELP, strict: true, allowPositionals: true }).positionals
  } catch (error) {
    throw new UsageError((error as Error).message)
  }
  if (positionals.length > 1) throw new UsageError('sql takes at most one table name')
  const [table] = positionals
  if (table !== undefined) tableName(table)
  io.stdout.write(postgresSchema(table))
  return EXIT_OK
}

function tableName (table: string): string {
  if (!TABLE_NAME.test(table)) throw new UsageError(`the table must be a name, optionally schema-qualified (billing.requests), not ${JSON.stringify(table)}`)
  return table
}

function storeSettings (values: Values): StoreSettings {
  const redis = values.redis as string | undefined
  const postgres = values.postgres as string | undefined
  if ((redis === undefined) === (postgres === undefined)) throw new UsageError('give one store: --redis URL or --postgres URL')
  const prefix = values.prefix as string | undefined
  const table = values.table as string | undefined
  if (redis !== undefined && table !== undefined) throw new UsageError('--table is for --postgres; a Redis store has a --prefix')
  if (postgres !== undefined && prefix !== undefined) throw new UsageError('--prefix is for --redis; a PostgreSQL store has a --table')
  const timeout = values.timeout === undefined ? DEFAULT_TIMEOUT : positiveInteger('--timeout', values.timeout as string)
  if (redis !== undefined) return { kind: 'redis', url: redis, shown: shownUrl('--redis', redis, ['redis:', 'rediss:']), prefix, table, timeout }
  return { kind: 'postgres', url: postgres as string, shown: shownUrl('--postgres', postgres as string, ['postgres:', 'postgresql:']), prefix, table: table === undefined ? undefined : tableName(table), timeout }
}

// Never the URL itself in a message: it may hold a password.
function shownUrl (flag: string, value: string, schemes: string[]): string {
  const expected = schemes.map((scheme) => `${scheme}//`).join(' or ')
  let url: URL
  try {
    url = new URL(value)
  } catch {
    throw new UsageError(`${flag} must be a ${expected} URL`)
  }
  if (!schemes.includes(url.protocol)) throw new UsageError(`${flag} must be a ${expected} URL, not ${url.protocol}//`)
  return `${url.protocol}//${url.host}${url.pathname}`
}

function positiveInteger (flag: string, value: string): number {
  const number = Number(value)
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(number) || number < 1) throw new UsageError(`${flag} must be a positive integer, not ${JSON.stringify(value)}`)
  return number
}

function identityOf (values: Values): RequestIdentity {
  for (const flag of ['method', 'route', 'key']) {
    if (values[flag] === undefined) throw new UsageError(`--${flag} is required: --method, --route and --key name the request`)
  }
  return {
    // Fastify reports methods upper case.
    method: (values.method as string).toUpperCase(),
    route: values.route as string,
    params: pairs('--param', values.param as string[] | undefined),
    constraints: constraintsOf(pairs('--constraint', values.constraint as string[] | undefined)),
    key: values.key as string,
    scope: values.scope as string | undefined
  }
}

function pairs (flag: string, given: string[] | undefined): Record<string, string> | undefined {
  if (given === undefined) return undefined
  const result: Record<string, string> = {}
  for (const pair of given) {
    const at = pair.indexOf('=')
    if (at < 1) throw new UsageError(`${flag} must be NAME=VALUE, not ${JSON.stringify(pair)}`)
    const name = pair.slice(0, at)
    if (Object.hasOwn(result, name)) throw new UsageError(`${flag} ${name} is given twice`)
    result[name] = pair.slice(at + 1)
  }
  return result
}

// A route may declare a host pattern (a RegExp): written /source/flags, as no host or version starts with a slash.
function constraintsOf (given: Record<string, string> | undefined): Record<string, string | RegExp> | undefined {
  if (given === undefined) return undefined
  const constraints: Record<string, string | RegExp> = {}
  for (const [name, value] of Object.entries(given)) {
    const pattern = /^\/(.+)\/([a-z]*)$/s.exec(value)
    try {
      constraints[name] = pattern === null ? value : new RegExp(pattern[1] as string, pattern[2])
    } catch (error) {
      throw new UsageError(`--constraint ${name}: ${(error as Error).message}`)
    }
  }
  return constraints
}

function listQuery (values: Values): ListQuery {
  const state = values.state as string | undefined
  if (state !== undefined && state !== 'halted' && state !== 'lapsed') throw new UsageError(`--state must be halted or lapsed, not ${JSON.stringify(state)}`)
  return {
    state: state as ListQuery['state'],
    limit: values.limit === undefined ? DEFAULT_LIMIT : positiveInteger('--limit', values.limit as string),
    cursor: values.cursor as string | undefined
  }
}

async function load (io: CliIo, name: string, flag: string): Promise<unknown> {
  try {
    return await (io.load ?? (async (module: string) => await import(module)))(name)
  } catch (error) {
    throw new StoreError(`${flag} needs the ${name} package (npm install ${name}): ${(error as Error).message}`)
  }
}

async function openRedis (settings: StoreSettings, io: CliIo): Promise<OpenStore> {
  const { Redis } = await load(io, 'ioredis', '--redis') as typeof import('ioredis')
  const { timeout } = settings
  // No reconnecting and no offline queue: a server that goes away fails the next call at once.
  const client = new Redis(settings.url, { lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 1, retryStrategy: () => null, connectTimeout: timeout })
  // connect() rejects with "Connection is closed."; the reason comes as an error event.
  let reason: Error | undefined
  client.on('error', (error: Error) => { reason = error })
  try {
    // connectTimeout covers the TCP connection only: a server that accepts and never answers would hang connect().
    await withTimeout(client.connect(), timeout, `no answer within ${timeout} ms`)
  } catch (error) {
    client.disconnect()
    throw new StoreError(`cannot reach redis at ${settings.shown}: ${(reason ?? error as Error).message}`)
  }
  return {
    store: new RedisStore({ client, prefix: settings.prefix ?? 'idem:', timeout }),
    close: async () => { client.disconnect() }
  }
}

async function openPostgres (settings: StoreSettings, io: CliIo): Promise<OpenStore> {
  const pg = (await load(io, 'pg', '--postgres') as { default: typeof import('pg') }).default
  const { timeout } = settings
  // query_timeout too, so that pool.end() never waits on a statement that hangs.
  const pool = new pg.Pool({ connectionString: settings.url, max: 1, connectionTimeoutMillis: timeout, query_timeout: timeout })
  // An idle connection that the server drops is reported by the pool; the next statement fails on its own.
  pool.on('error', () => {})
  try {
    (await pool.connect()).release()
  } catch (error) {
    await pool.end()
    throw new StoreError(`cannot reach postgres at ${settings.shown}: ${(error as Error).message}`)
  }
  return {
    store: new PostgresStore({ pool, table: settings.table ?? 'idempotency_requests', timeout }),
    close: async () => { await pool.end() }
  }
}

function jsonLogger (io: CliIo): TrackerLogger {
  return {
    warn (object, message) {
      io.stderr.write(`${JSON.stringify({ level: 'warn', time: Date.now(), msg: message, ...object })}\n`)
    }
  }
}

async function find (tracker: RequestTracker, identity: RequestIdentity, io: CliIo): Promise<number> {
  const found = await tracker.find(identity)
  if (found === undefined) {
    io.stderr.write(NOT_FOUND)
    return EXIT_NOT_FOUND
  }
  io.stdout.write(`${JSON.stringify(found, null, 2)}\n`)
  return EXIT_OK
}

async function forget (tracker: RequestTracker, identity: RequestIdentity, io: CliIo): Promise<number> {
  if (!await tracker.forget(identity)) {
    const running = await tracker.find(identity)
    io.stderr.write(running === undefined ? NOT_FOUND : 'that request still runs (its lease is live): not removed\n')
    return EXIT_NOT_FOUND
  }
  io.stdout.write(`forgotten ${tracker.recordOf(tracker.keyOf(identity))}\n`)
  return EXIT_OK
}

async function list (tracker: RequestTracker, query: ListQuery, json: boolean, io: CliIo): Promise<number> {
  const { records, cursor } = await tracker.list(query)
  if (json) {
    // As the stores write identities: a host pattern (a RegExp) keeps its source.
    for (const record of records) io.stdout.write(`${identityJson(record)}\n`)
  } else if (records.length > 0) {
    io.stdout.write(table([['STATE', 'SINCE', 'METHOD', 'ROUTE', 'PARAMS', 'SCOPE', 'KEY', 'RECORD'], ...records.map(row)]))
  }
  if (cursor !== undefined) io.stderr.write(`next page: --cursor ${shellQuoted(cursor)}\n`)
  return EXIT_OK
}

function row (record: ListedRecord): string[] {
  const identity = record.identity
  const params = Object.entries(identity?.params ?? {}).map(([name, value]) => `${name}=${String(value)}`).join(',')
  return [
    record.state === 'halted' ? 'halted' : 'lapsed',
    record.createdAt === undefined ? '-' : new Date(record.createdAt).toISOString(),
    cell(identity?.method),
    cell(identity?.route),
    cell(params === '' ? undefined : params),
    cell(identity?.scope),
    cell(identity?.key),
    record.key
  ]
}

// Text from requests is quoted unless it is visible ASCII: no space breaks a column and no
// control character reaches the operator's terminal.
function cell (text: string | undefined): string {
  if (text === undefined) return '-'
  return /^[\x21-\x7e]+$/.test(text) ? text : JSON.stringify(text)
}

function table (rows: string[][]): string {
  const widths = (rows[0] as string[]).map((_, column) => Math.max(...rows.map((cells) => (cells[column] as string).length)))
  return rows.map((cells) => `${cells.map((text, column) => text.padEnd(widths[column] as number)).join('  ').trimEnd()}\n`).join('')
}

// The PostgreSQL cursor is JSON with spaces and quotes: printed ready to paste into a shell.
function shellQuoted (text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", "'\\''")}'`
}

import { spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { createServer, type Server } from 'node:net'
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import pg from 'pg'
import idempotency, { PostgresStore, RedisStore, RequestTracker, POSTGRES_SCHEMA, postgresSchema, type IdempotencyOptions, type IdempotencyStore, type RequestIdentity } from '../lib/index.js'
import { main, USAGE, type CliIo } from '../lib/cli.js'
import { freePort, redisCommand, requireRedis, startRedis } from './helpers/redis-server.js'
import { requirePostgres, startPostgres } from './helpers/postgres-server.js'
import { deferred, key, sleep } from './helpers/timing.js'

// A DATABASE_URL server outlives the run: keys and tables of this run are its own.
const run = `${process.pid}-${Date.now()}`
const tableRun = `${process.pid}_${Date.now()}`
const HELP_HINT = '(fastify-idempotency --help shows the usage)\n'

interface Result {
  code: number
  stdout: string
  stderr: string
}

/** Runs the command line in this process, as bin.js does. */
async function cli (args: string[], load?: CliIo['load']): Promise<Result> {
  let stdout = ''
  let stderr = ''
  const code = await main(args, {
    stdout: { write: (text: string) => { stdout += text } },
    stderr: { write: (text: string) => { stderr += text } },
    load
  })
  return { code, stdout, stderr }
}

/** A usage error: exit 2, a line naming the mistake (Node's own words for what parseArgs rejects), and the hint. */
function usageError (t: Test, result: Result, message: string | RegExp): void {
  t.equal(result.code, 2, `exit 2: ${String(message)}`)
  if (typeof message === 'string') {
    t.equal(result.stderr, `fastify-idempotency: ${message}\n${HELP_HINT}`)
  } else {
    t.match(result.stderr, message)
    t.ok(result.stderr.endsWith(`\n${HELP_HINT}`), 'and the hint')
  }
  t.equal(result.stdout, '')
}

/** The table `list` prints, as rows of cells (columns are at least two spaces apart). */
function tableRows (stdout: string): string[][] {
  return stdout.trimEnd().split('\n').map((line) => line.split(/ {2,}/))
}

/** The cursor of the `next page` line, unquoted as a shell would; `undefined` when there is none. */
function nextCursor (stderr: string): string | undefined {
  const match = /^next page: --cursor (.*)$/m.exec(stderr)
  if (match === null) return undefined
  const quoted = match[1] as string
  return quoted.startsWith("'") ? quoted.slice(1, -1).replaceAll("'\\''", "'") : quoted
}

/** A server that accepts connections and never answers. */
async function silentServer (t: Test): Promise<number> {
  const server: Server = createServer(() => {})
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => {
    server.close()
  })
  return (server.address() as { port: number }).port
}

t.test('--help or -h anywhere prints the usage on stdout and exits 0', async (t) => {
  for (const args of [['--help'], ['-h'], ['find', '--redis', 'redis://127.0.0.1:1', '-h'], ['nonsense', '--help'], ['list', '--bogus', '-h']]) {
    t.strictSame(await cli(args), { code: 0, stdout: USAGE, stderr: '' }, args.join(' '))
  }
  // The value of another flag is not a request for help.
  usageError(t, await cli(['find', '--redis', 'redis://127.0.0.1:1', '--method', 'POST', '--route', '/x', '--key=-h', '--scope']),
    /^fastify-idempotency: Option '--scope <value>' argument missing/)
})

t.test('sql prints the PostgreSQL table, for the default name or the one given', async (t) => {
  t.strictSame(await cli(['sql']), { code: 0, stdout: POSTGRES_SCHEMA, stderr: '' })
  t.strictSame(await cli(['sql', 'billing.requests']), { code: 0, stdout: postgresSchema('billing.requests'), stderr: '' })
  usageError(t, await cli(['sql', 'a"; DROP TABLE users; --']), 'the table must be a name, optionally schema-qualified (billing.requests), not "a\\"; DROP TABLE users; --"')
  usageError(t, await cli(['sql', 'one', 'two']), 'sql takes at most one table name')
  usageError(t, await cli(['sql', '--table', 'x']), /^fastify-idempotency: Unknown option '--table'/)
})

t.test('without a command it prints the usage on stderr and exits 2', async (t) => {
  t.strictSame(await cli([]), { code: 2, stdout: '', stderr: USAGE })
})

t.test('usage errors exit 2 with a one-line message, before any store is reached', async (t) => {
  // Port 1 refuses: were it reached, these would exit 3.
  const redis = ['--redis', 'redis://127.0.0.1:1']
  const postgres = ['--postgres', 'postgres://127.0.0.1:1/db']
  const request = ['--method', 'POST', '--route', '/orders', '--key', 'k']
  usageError(t, await cli(['remove', ...redis, ...request]), 'unknown command "remove"')
  usageError(t, await cli(['find', ...redis, ...request, '--limit', '5']), /^fastify-idempotency: Unknown option '--limit'/)
  usageError(t, await cli(['list', ...redis, '--key', 'k']), /^fastify-idempotency: Unknown option '--key'/)
  usageError(t, await cli(['forget', ...redis, ...request, 'extra']), /^fastify-idempotency: Unexpected argument 'extra'/)
  for (const flag of ['--method', '--route', '--key']) {
    const without = request.filter((_, index) => request[index] !== flag && request[index - 1] !== flag)
    usageError(t, await cli(['find', ...redis, ...without]), `${flag} is required: --method, --route and --key name the request`)
  }
  usageError(t, await cli(['find', ...request]), 'give one store: --redis URL or --postgres URL')
  usageError(t, await cli(['find', ...redis, ...postgres, ...request]), 'give one store: --redis URL or --postgres URL')
  usageError(t, await cli(['find', ...redis, '--table', 'requests', ...request]), '--table is for --postgres; a Redis store has a --prefix')
  usageError(t, await cli(['find', ...postgres, '--prefix', 'idem:', ...request]), '--prefix is for --redis; a PostgreSQL store has a --table')
  usageError(t, await cli(['find', ...postgres, '--table', 'requests;', ...request]), 'the table must be a name, optionally schema-qualified (billing.requests), not "requests;"')
  usageError(t, await cli(['find', '--redis', 'http://127.0.0.1:6379', ...request]), '--redis must be a redis:// or rediss:// URL, not http://')
  usageError(t, await cli(['find', '--redis', 'postgres://127.0.0.1/db', ...request]), '--redis must be a redis:// or rediss:// URL, not postgres://')
  usageError(t, await cli(['find', '--postgres', 'redis://127.0.0.1:6379', ...request]), '--postgres must be a postgres:// or postgresql:// URL, not redis://')
  // Never echoed: an unparsable URL may still hold a password.
  usageError(t, await cli(['find', '--redis', 'secret@127.0.0.1', ...request]), '--redis must be a redis:// or rediss:// URL')
  usageError(t, await cli(['find', ...redis, '--timeout', '0', ...request]), '--timeout must be a positive integer, not "0"')
  usageError(t, await cli(['find', ...redis, ...request, '--param', 'id']), '--param must be NAME=VALUE, not "id"')
  usageError(t, await cli(['find', ...redis, ...request, '--param', '=42']), '--param must be NAME=VALUE, not "=42"')
  usageError(t, await cli(['find', ...redis, ...request, '--param', 'id=1', '--param', 'id=2']), '--param id is given twice')
  usageError(t, await cli(['find', ...redis, ...request, '--constraint', 'host']), '--constraint must be NAME=VALUE, not "host"')
  usageError(t, await cli(['find', ...redis, ...request, '--constraint', 'host=/(/']), '--constraint host: Invalid regular expression: /(/: Unterminated group')
  for (const limit of ['0', '-1', '1.5', 'ten', '99999999999999999']) {
    usageError(t, await cli(['list', ...redis, `--limit=${limit}`]), `--limit must be a positive integer, not ${JSON.stringify(limit)}`)
  }
  usageError(t, await cli(['list', ...postgres, '--state', 'processing']), '--state must be halted or lapsed, not "processing"')
})

t.test('a store package that cannot be loaded exits 3, saying what to install', async (t) => {
  const missing = async (name: string) => await import(`./no-such-package-${name}.js`)
  const request = ['--method', 'POST', '--route', '/orders', '--key', 'k']
  const redis = await cli(['find', '--redis', 'redis://127.0.0.1:1', ...request], missing)
  t.equal(redis.code, 3)
  t.match(redis.stderr, /^fastify-idempotency: --redis needs the ioredis package \(npm install ioredis\): Cannot find module .*no-such-package-ioredis\.js/)
  t.equal(redis.stdout, '')
  const postgres = await cli(['list', '--postgres', 'postgres://127.0.0.1:1/db'], missing)
  t.equal(postgres.code, 3)
  t.match(postgres.stderr, /^fastify-idempotency: --postgres needs the pg package \(npm install pg\): Cannot find module .*no-such-package-pg\.js/)
})

t.test('a server that accepts and never answers exits 3 once --timeout passed', async (t) => {
  const port = await silentServer(t)
  const request = ['--method', 'POST', '--route', '/orders', '--key', 'k', '--timeout', '200']
  const redis = await cli(['find', '--redis', `redis://user:secret@127.0.0.1:${port}`, ...request])
  t.equal(redis.code, 3)
  t.equal(redis.stderr, `fastify-idempotency: cannot reach redis at redis://127.0.0.1:${port}: no answer within 200 ms\n`, 'names the server, never its password')
  const postgres = await cli(['find', '--postgres', `postgres://user:secret@127.0.0.1:${port}/db`, ...request])
  t.equal(postgres.code, 3)
  t.equal(postgres.stderr, `fastify-idempotency: cannot reach postgres at postgres://127.0.0.1:${port}/db: Connection terminated due to connection timeout\n`)
})

interface StoreCase {
  name: string
  guard: (t: Test) => boolean
  /** Starts the server for the case's tests, and answers what stops it. */
  start: () => Promise<{ url: string, stop: () => Promise<void> }>
  /** A store on `url` for the app (`place`: a prefix or table of the test's own, or the default), the CLI's flags for it, and what closes it. */
  open: (url: string, place: string | undefined) => Promise<{ store: IdempotencyStore, flags: string[], close: () => Promise<void> }>
  /** A URL on which nothing listens, and how the CLI names it. */
  unreachable: () => Promise<{ url: string, shown: string }>
}

const storeCases: StoreCase[] = [
  {
    name: 'Redis',
    guard: requireRedis,
    start: async () => {
      const server = await startRedis()
      return { url: server.url, stop: server.stop }
    },
    open: async (url, place) => {
      const client = new Redis(url)
      const prefix = place === undefined ? undefined : `cli-${place}-${run}:`
      return {
        store: new RedisStore({ client, ...(prefix === undefined ? {} : { prefix }) }),
        flags: ['--redis', url, ...(prefix === undefined ? [] : ['--prefix', prefix])],
        close: async () => { client.disconnect() }
      }
    },
    unreachable: async () => {
      // A server stopped, as one that crashed: its port refuses.
      const server = await startRedis()
      await server.stop()
      return { url: server.url, shown: server.url }
    }
  },
  {
    name: 'PostgreSQL',
    guard: requirePostgres,
    start: async () => {
      const server = await startPostgres()
      return { url: server.connectionString, stop: server.destroy }
    },
    open: async (url, place) => {
      const pool = new pg.Pool({ connectionString: url, max: 2 })
      const table = place === undefined ? undefined : `cli_${place}_${tableRun}`
      return {
        store: new PostgresStore({ pool, ...(table === undefined ? {} : { table }), createTable: true }),
        flags: ['--postgres', url, ...(table === undefined ? [] : ['--table', table])],
        close: async () => {
          if (table !== undefined) await pool.query(`DROP TABLE IF EXISTS ${table}`)
          await pool.end()
        }
      }
    },
    unreachable: async () => {
      const url = `postgresql://postgres:secret@127.0.0.1:${await freePort()}/postgres`
      return { url, shown: url.replace('postgres:secret@', '') }
    }
  }
]

/** A Fastify with the plugin on `store`; the test closes it, then `close`. */
async function appFor (t: Test, store: IdempotencyStore, close: () => Promise<void>, options: IdempotencyOptions = {}): Promise<FastifyInstance> {
  const app = Fastify()
  t.teardown(async () => {
    await app.close()
    await close()
  })
  await app.register(idempotency, { store, ...options })
  return app
}

/** A tracker on the app's store, as the CLI builds one: for the storage key of an identity. */
function trackerOf (store: IdempotencyStore): RequestTracker {
  return new RequestTracker(store, { logger: { warn () {} }, cacheTtl: 86_400_000, processingTtl: 60_000, releaseOnError: false })
}

for (const storeCase of storeCases) {
  t.test(`operating on ${storeCase.name}`, async (t) => {
    if (!storeCase.guard(t)) return
    const server = await storeCase.start()
    t.teardown(server.stop)

    t.test('find prints a completed request\'s record: its status and body size', async (t) => {
      const { store, flags, close } = await storeCase.open(server.url, undefined)
      const app = await appFor(t, store, close)
      let runs = 0
      app.post('/orders/:id', { config: { idempotency: true }, constraints: { host: 'a.example.com' } }, async (request, reply) => {
        const { id } = request.params as { id: string }
        return reply.code(201).send({ id, status: 'created', run: ++runs })
      })
      const sent = `order-${run}`
      const response = await app.inject({ method: 'POST', url: '/orders/42', headers: { host: 'a.example.com', ...key(sent) }, payload: { amount: 100 } })
      t.equal(response.statusCode, 201)
      const identity: RequestIdentity = { method: 'POST', route: '/orders/:id', params: { id: '42' }, constraints: { host: 'a.example.com' }, key: sent }
      const request = ['--method', 'post', '--route', '/orders/:id', '--param', 'id=42', '--constraint', 'host=a.example.com', '--key', sent]
      const found = await cli(['find', ...flags, ...request])
      t.equal(found.code, 0, found.stderr)
      t.equal(found.stderr, '')
      t.ok(found.stdout.startsWith('{\n  "record": '), 'pretty JSON, two spaces')
      const record = JSON.parse(found.stdout) as Record<string, unknown>
      t.strictSame(record, {
        record: trackerOf(store).keyOf(identity),
        state: 'completed',
        expiresAt: record.expiresAt,
        leaseExpired: false,
        statusCode: 201,
        headers: record.headers,
        bodySize: Buffer.byteLength(response.body)
      })
      t.type(record.expiresAt, 'number')
      t.match(record.headers, { 'content-type': 'application/json; charset=utf-8' }, 'the headers the route set')
      // Another parameter, another constraint or no constraint: another request.
      for (const other of [['--param', 'id=43', '--constraint', 'host=a.example.com'], ['--param', 'id=42', '--constraint', 'host=b.example.com'], ['--param', 'id=42']]) {
        t.strictSame(await cli(['find', ...flags, '--method', 'POST', '--route', '/orders/:id', ...other, '--key', sent]), { code: 1, stdout: '', stderr: 'no live record for that request\n' }, other.join(' '))
      }
      t.strictSame(await cli(['find', ...flags, ...request.slice(0, -1), `unknown-${run}`]), { code: 1, stdout: '', stderr: 'no live record for that request\n' }, 'an unknown key')
      t.equal(runs, 1)
    })

    t.test('forget leaves a request that still runs, and says so', async (t) => {
      const { store, flags, close } = await storeCase.open(server.url, 'running')
      const app = await appFor(t, store, close)
      const finish = deferred()
      const started = deferred()
      app.post('/refunds', { config: { idempotency: true } }, async () => {
        started.resolve()
        await finish.promise
        return { refunded: true }
      })
      const sent = `refund-${run}`
      const refund = app.inject({ method: 'POST', url: '/refunds', headers: key(sent), payload: {} })
      await started.promise
      const request = ['--method', 'POST', '--route', '/refunds', '--key', sent]
      t.strictSame(await cli(['forget', ...flags, ...request]), { code: 1, stdout: '', stderr: 'that request still runs (its lease is live): not removed\n' })
      finish.resolve()
      t.equal((await refund).statusCode, 200)
      t.match(JSON.parse((await cli(['find', ...flags, ...request])).stdout), { state: 'completed' }, 'its owner completed it')
    })

    t.test('a halted request is listed, forgotten, and then its retry runs the handler', async (t) => {
      const { store, flags, close } = await storeCase.open(server.url, 'halted')
      const app = await appFor(t, store, close, { scope: (request) => request.headers['x-user'] as string })
      let runs = 0
      app.post('/payments/:account', { config: { idempotency: true } }, async (_request, reply) => {
        if (++runs === 1) throw new Error('the card network hung up')
        return reply.code(201).send({ paid: true, run: runs })
      })
      const sent = `payment-${run}`
      const pay = () => app.inject({ method: 'POST', url: '/payments/acc-1', headers: { 'x-user': 'user-1', ...key(sent) }, payload: { amount: 100 } })
      t.equal((await pay()).statusCode, 500, 'the handler threw')
      const halted = await pay()
      t.equal(halted.statusCode, 500)
      t.equal(halted.json().code, 'FST_IDEMPOTENCY_HALTED', 'a retry is told the outcome is unknown')
      t.equal(runs, 1)

      const listed = await cli(['list', ...flags, '--state', 'halted'])
      t.equal(listed.code, 0, listed.stderr)
      t.equal(listed.stderr, '', 'one page')
      const rows = tableRows(listed.stdout)
      t.strictSame(rows[0], ['STATE', 'SINCE', 'METHOD', 'ROUTE', 'PARAMS', 'SCOPE', 'KEY', 'RECORD'])
      t.equal(rows.length, 2, 'one record')
      const [state, since, method, route, params, scope, listedKey, record] = rows[1] as string[]
      t.strictSame([state, method, route, params, scope, listedKey], ['halted', 'POST', '/payments/:account', 'account=acc-1', 'user-1', sent])
      t.equal(new Date(since as string).toISOString(), since, 'since: an ISO time')
      const identity: RequestIdentity = { method: 'POST', route: '/payments/:account', params: { account: 'acc-1' }, key: sent, scope: 'user-1' }
      t.equal(record, trackerOf(store).keyOf(identity), 'the record key')
      t.strictSame(await cli(['list', ...flags, '--state', 'lapsed']), { code: 0, stdout: '', stderr: '' }, 'no lapsed lease')

      const json = await cli(['list', ...flags, '--json'])
      t.equal(json.code, 0)
      const lines = json.stdout.trimEnd().split('\n')
      t.equal(lines.length, 1)
      const entry = JSON.parse(lines[0] as string) as Record<string, unknown>
      t.strictSame(entry, {
        key: record,
        state: 'halted',
        leaseExpired: false,
        expiresAt: entry.expiresAt,
        createdAt: new Date(since as string).getTime(),
        identity: { method: 'POST', route: '/payments/:account', params: { account: 'acc-1' }, constraints: {}, key: sent, scope: 'user-1' }
      })

      const request = ['--method', 'POST', '--route', '/payments/:account', '--param', 'account=acc-1', '--key', sent]
      const found = await cli(['find', ...flags, ...request, '--scope', 'user-1'])
      t.equal(found.code, 0)
      t.match(JSON.parse(found.stdout), { record, state: 'halted', leaseExpired: false, createdAt: new Date(since as string).getTime() })
      t.equal((await cli(['find', ...flags, ...request])).code, 1, 'without its scope, another request')

      const forgotten = await cli(['forget', ...flags, ...request, '--scope', 'user-1'])
      t.equal(forgotten.code, 0)
      t.equal(forgotten.stdout, `forgotten ${record as string}\n`)
      t.match(JSON.parse(forgotten.stderr), { level: 'warn', msg: 'idempotency record forgotten by an operator', record, method: 'POST', route: '/payments/:account' })
      t.notMatch(forgotten.stderr, sent, 'the log never names the client\'s key')
      t.strictSame(await cli(['list', ...flags]), { code: 0, stdout: '', stderr: '' }, 'nothing left to decide')
      const again = await cli(['forget', ...flags, ...request, '--scope', 'user-1'])
      t.equal(again.code, 1, 'nothing left to forget')
      t.equal(again.stdout, '')
      t.equal(again.stderr, 'no live record for that request\n')

      const retried = await pay()
      t.equal(retried.statusCode, 201)
      t.strictSame(retried.json(), { paid: true, run: 2 })
      t.equal(runs, 2, 'the handler ran once more')
      const replayed = await pay()
      t.equal(replayed.headers['idempotent-replayed'], 'true')
      t.equal(runs, 2, 'and the retry after it replays')
    })

    t.test('list pages through the records with --limit and --cursor', async (t) => {
      const { store, flags, close } = await storeCase.open(server.url, 'pages')
      const app = await appFor(t, store, close)
      app.post('/jobs', { config: { idempotency: true } }, async () => { throw new Error('job failed') })
      const keys = [1, 2, 3].map((page) => `job-${page}-${run}`)
      for (const sent of keys) t.equal((await app.inject({ method: 'POST', url: '/jobs', headers: key(sent), payload: {} })).statusCode, 500)
      const seen: string[] = []
      let cursor: string | undefined
      let pages = 0
      do {
        const page = await cli(['list', ...flags, '--state', 'halted', '--limit', '1', '--json', ...(cursor === undefined ? [] : ['--cursor', cursor])])
        t.equal(page.code, 0, page.stderr)
        const lines = page.stdout.trimEnd().split('\n')
        t.equal(lines.length, 1, `page ${++pages}: one record`)
        seen.push(...lines.map((line) => (JSON.parse(line) as { identity: RequestIdentity }).identity.key))
        cursor = nextCursor(page.stderr)
        t.equal(page.stderr === '', cursor === undefined, 'stderr holds the next page, and nothing else')
      } while (cursor !== undefined && pages < 10)
      t.equal(pages, 3, 'three pages, and the last says there is no next one')
      t.strictSame(seen.sort(), keys.sort(), 'each record once')
    })

    t.test('list shows a request whose instance died, and one kept without its request', async (t) => {
      const { store, flags, close } = await storeCase.open(server.url, 'lapsed')
      t.teardown(close)
      const tracker = trackerOf(store)
      const identity: RequestIdentity = { method: 'PUT', route: '/profiles/:name', params: { name: 'ann' }, constraints: { host: /^api\./i }, key: `profile-${run}`, scope: 'tenant a' }
      const storageKey = tracker.keyOf(identity)
      // The instance that owns the request stops renewing its 1 ms lease, as a dead one would.
      const tracked = await tracker.track(storageKey, 'fingerprint', { cacheTtl: 60_000, processingTtl: 1, releaseOnError: false }, identity)
      t.equal(tracked.status, 'created')
      tracker.close()
      // Records written before the plugin kept who sent them have no identity.
      const bare = `bare-${run}`
      await store.insert(bare, { fingerprint: 'fingerprint', owner: 'gone', expiresAt: Date.now() + 60_000, lease: 60_000, takeOverExpiredLease: false })
      await store.update(bare, 'gone', { state: 'halted', expiresAt: Date.now() + 60_000 })
      await sleep(20)

      const lapsed = await cli(['list', ...flags, '--state', 'lapsed'])
      t.equal(lapsed.code, 0, lapsed.stderr)
      const rows = tableRows(lapsed.stdout)
      t.equal(rows.length, 2)
      const [state, , ...rest] = rows[1] as string[]
      t.strictSame([state, ...rest], ['lapsed', 'PUT', '/profiles/:name', 'name=ann', '"tenant a"', identity.key, storageKey], 'a scope with a space is quoted')
      const json = await cli(['list', ...flags, '--state', 'lapsed', '--json'])
      t.match(JSON.parse(json.stdout), { identity: { constraints: { host: { $pattern: '^api\\.', flags: 'i' } } } }, '--json keeps a host pattern')
      const found = await cli(['find', ...flags, '--method', 'PUT', '--route', '/profiles/:name', '--param', 'name=ann', '--constraint', 'host=/^api\\./i', '--scope', 'tenant a', '--key', identity.key])
      t.match(JSON.parse(found.stdout), { record: storageKey, state: 'processing', leaseExpired: true, leaseExpiresAt: Number })

      const halted = tableRows((await cli(['list', ...flags, '--state', 'halted'])).stdout)
      t.equal(halted.length, 2)
      const [bareState, bareSince, ...bareRest] = halted[1] as string[]
      t.strictSame([bareState, ...bareRest], ['halted', '-', '-', '-', '-', '-', bare])
      // PostgreSQL stamps every row; a Redis record keeps only what it was given.
      t.equal(bareSince, storeCase.name === 'Redis' ? '-' : new Date(bareSince as string).toISOString())
    })

    t.test('a store call that fails exits 3, naming the store and the operation', async (t) => {
      const { store, flags, close } = await storeCase.open(server.url, 'broken')
      t.teardown(close)
      const identity: RequestIdentity = { method: 'POST', route: '/orders', key: `broken-${run}` }
      const storageKey = trackerOf(store).keyOf(identity)
      if (storeCase.name === 'Redis') {
        // A value under the record's key that this store did not write.
        await redisCommand(Number(new URL(server.url).port), 'SET', `${flags[3] as string}${storageKey}`, 'not a record')
      }
      // PostgreSQL: the table was never created, as nothing used the store.
      const failed = await cli(['find', ...flags, '--method', 'POST', '--route', '/orders', '--key', identity.key])
      t.equal(failed.code, 3)
      t.equal(failed.stdout, '')
      t.match(failed.stderr, storeCase.name === 'Redis'
        ? /^fastify-idempotency: redis find failed at redis:\/\/127\.0\.0\.1:\d+: redis record is not one this store wrote\n$/
        : /^fastify-idempotency: postgres find failed at postgres(ql)?:\/\/[^ @]*: relation "cli_broken_\w+" does not exist\n$/)
    })

    t.test('an unreachable server exits 3 at once, naming it', async (t) => {
      const { url, shown } = await storeCase.unreachable()
      const flag = storeCase.name === 'Redis' ? '--redis' : '--postgres'
      const { port } = new URL(url)
      const request = ['--method', 'POST', '--route', '/orders', '--key', 'k']
      for (const [command, rest] of [['find', request], ['forget', request], ['list', []]] as const) {
        const result = await cli([command, flag, url, ...rest])
        t.equal(result.code, 3, command)
        t.equal(result.stdout, '')
        t.equal(result.stderr, `fastify-idempotency: cannot reach ${storeCase.name === 'Redis' ? 'redis' : 'postgres'} at ${shown}: connect ECONNREFUSED 127.0.0.1:${port}\n`)
      }
    })
  })
}

t.test('the built command line prints its usage and the SQL', async (t) => {
  // `npm test` builds dist/ first.
  const bin = new URL('../dist/bin.js', import.meta.url).pathname
  const help = spawnSync(process.execPath, [bin, '--help'], { encoding: 'utf8' })
  t.strictSame({ status: help.status, stdout: help.stdout, stderr: help.stderr }, { status: 0, stdout: USAGE, stderr: '' })
  const sql = spawnSync(process.execPath, [bin, 'sql'], { encoding: 'utf8' })
  t.strictSame({ status: sql.status, stdout: sql.stdout, stderr: sql.stderr }, { status: 0, stdout: POSTGRES_SCHEMA, stderr: '' })
})

import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance, type InjectOptions, type RouteShorthandOptions } from 'fastify'
import { Redis } from 'ioredis'
import pg from 'pg'
import idempotency, { PostgresStore, RedisStore, type IdempotencyOptions, type IdempotencyStore } from '../lib/index.js'
import { requireRedis, startRedis } from './helpers/redis-server.js'
import { requirePostgres, startPostgres } from './helpers/postgres-server.js'
import { key } from './helpers/timing.js'

// A DATABASE_URL server outlives the run: keys of this run are its own.
const run = `${process.pid}-${Date.now()}`
const payload = { amount: 100 }

/** A request of one case, and the body its handler answers it with (run: which run of that case). */
interface Call {
  name: string
  request: InjectOptions
  body: Record<string, unknown>
}

/** Sends every call once (each must run its own handler), then each again (each must replay its own response). */
async function firstThenRetry (t: Test, app: FastifyInstance, calls: Call[]): Promise<void> {
  for (const retry of [false, true]) {
    for (const call of calls) {
      const response = await app.inject({ method: 'POST', payload, ...call.request })
      const what = `${call.name}, ${retry ? 'retry' : 'first request'}`
      t.equal(response.statusCode, 201, `${what}: status`)
      t.strictSame(response.json(), call.body, `${what}: its own body`)
      t.equal(response.headers['idempotent-replayed'], retry ? 'true' : undefined, `${what}: ${retry ? 'a replay' : 'not a replay'}`)
    }
  }
}

/** A Fastify with the plugin registered; the test closes it when it ends. */
async function appFor (t: Test, options: IdempotencyOptions = {}, close = async () => {}): Promise<FastifyInstance> {
  const app = Fastify()
  t.teardown(async () => {
    await app.close()
    await close()
  })
  await app.register(idempotency, options)
  return app
}

/** Counts the handler's runs per name; `count(name)` is the run number of this call. */
function counter (): { runs: Record<string, number>, count: (name: string) => number } {
  const runs: Record<string, number> = {}
  return { runs, count: (name) => (runs[name] = (runs[name] ?? 0) + 1) }
}

type ConstraintStrategy = Parameters<FastifyInstance['addConstraintStrategy']>[0]
type Handler = ReturnType<ReturnType<ConstraintStrategy['storage']>['get']>

/** A custom constraint: the tenant named by the x-tenant header. */
const tenantStrategy: ConstraintStrategy = {
  name: 'tenant',
  storage () {
    const handlers = new Map<string, Handler>()
    return { get: (value: string) => handlers.get(value) ?? null, set: (value: string, store: Handler) => { handlers.set(value, store) } }
  },
  deriveConstraint: (request) => request.headers['x-tenant'] as string,
  mustMatchWhenDerived: true
}

const constraintCases = [
  { kind: 'host', constraints: [{ host: 'a.example.com' }, { host: 'b.example.com' }], headers: [{ host: 'a.example.com' }, { host: 'b.example.com' }] },
  { kind: 'version', constraints: [{ version: '1.0.0' }, { version: '2.0.0' }], headers: [{ 'accept-version': '1.0.0' }, { 'accept-version': '2.0.0' }] },
  { kind: 'custom strategy', constraints: [{ tenant: 'a' }, { tenant: 'b' }], headers: [{ 'x-tenant': 'a' }, { 'x-tenant': 'b' }], strategy: tenantStrategy }
]

for (const { kind, constraints, headers, strategy } of constraintCases) {
  t.test(`routes on one path that differ by their ${kind} constraint keep the same key apart`, async (t) => {
    const app = await appFor(t)
    if (strategy !== undefined) app.addConstraintStrategy(strategy)
    const { runs, count } = counter()
    const tenants = ['a', 'b']
    tenants.forEach((tenant, index) => {
      const options = { constraints: constraints[index], config: { idempotency: true } } as RouteShorthandOptions
      app.post('/orders', options, async (request, reply) => reply.code(201).send({ tenant, run: count(tenant) }))
    })
    await firstThenRetry(t, app, tenants.map((tenant, index) => ({
      name: `tenant ${tenant}`,
      request: { url: '/orders', headers: { ...headers[index], ...key('same') } },
      body: { tenant, run: 1 }
    })))
    t.strictSame(runs, { a: 1, b: 1 }, 'each tenant\'s handler ran once')
  })
}

// Scopes as the scope function returns them, looked up by the caller's token: ill-formed UTF-16
// (lone surrogates), U+FFFD (what a lone surrogate becomes in UTF-8), and the separators of the encoding.
const scopes: Record<string, string> = {
  high: '\ud800',
  replacement: '\ufffd',
  low: '\udc00',
  pair: '\ud800\udc00',
  plain: 'user',
  quoted: 'user","k',
  comma: 'user,k',
  newline: 'user\nPOST',
  empty: ''
}

interface StoreCase {
  name: string
  guard: (t: Test) => boolean
  /** A store, and what closes it (after the app). */
  open: (t: Test) => Promise<{ store?: IdempotencyStore, close?: () => Promise<void> }>
}

const storeCases: StoreCase[] = [
  { name: 'the memory store', guard: () => true, open: async () => ({}) },
  {
    name: 'Redis',
    guard: requireRedis,
    open: async () => {
      const server = await startRedis()
      const client = new Redis({ host: '127.0.0.1', port: server.port })
      return { store: new RedisStore({ client, prefix: 'keys-test:' }), close: async () => { client.disconnect(); await server.stop() } }
    }
  },
  {
    name: 'PostgreSQL',
    guard: requirePostgres,
    open: async () => {
      const server = await startPostgres()
      const pool = new pg.Pool({ connectionString: server.connectionString, max: 5 })
      return { store: new PostgresStore({ pool, table: 'keys_test_requests', createTable: true }), close: async () => { await pool.end(); await server.destroy() } }
    }
  }
]

for (const { name, guard, open } of storeCases) {
  t.test(`scopes never meet, lone surrogates and separators included, in ${name}`, async (t) => {
    if (!guard(t)) return
    const { store, close } = await open(t)
    const app = await appFor(t, {
      ...(store === undefined ? {} : { store }),
      scope: (request) => scopes[request.headers.authorization as string] as string
    }, close)
    const { runs, count } = counter()
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
      const token = request.headers.authorization as string
      return reply.code(201).send({ token, scope: scopes[token], run: count(`${token} ${request.idempotencyKey as string}`) })
    })
    const tokens = Object.keys(scopes)
    const same = `scoped-${run}`
    // Unescaped, scope 'user' with key `k","K` and scope `user","k` with key K would write the same text.
    const borrowed = { token: 'plain', key: `k","${same}` }
    const calls = [...tokens.map((token) => ({ token, key: same })), borrowed]
    await firstThenRetry(t, app, calls.map(({ token, key: sent }) => ({
      name: `scope ${JSON.stringify(scopes[token])} with key ${sent}`,
      request: { url: '/orders', headers: { authorization: token, ...key(sent) } },
      body: { token, scope: scopes[token], run: 1 }
    })))
    t.strictSame(runs, Object.fromEntries(calls.map(({ token, key: sent }) => [`${token} ${sent}`, 1])), 'the handler ran once for each scope and key')
  })
}

t.test('route parameters with separator-like values do not meet under one key', async (t) => {
  const app = await appFor(t)
  const { runs, count } = counter()
  app.post('/orders/:id', { config: { idempotency: true } }, async (request, reply) => {
    const { id } = request.params as { id: string }
    return reply.code(201).send({ id, run: count(id) })
  })
  // raw path segment -> the parameter the router decodes it to
  const ids: Array<[string, string]> = [
    ['a,b', 'a,b'], ['a', 'a'], ['b', 'b'], ['%22', '"'], ['a%22%2C%22b', 'a","b'], ['%22a%22', '"a"'], ['a%7D%2C%7B', 'a},{']
  ]
  await firstThenRetry(t, app, ids.map(([segment, id]) => ({
    name: `/orders/${segment}`,
    request: { url: `/orders/${segment}`, headers: key('same') },
    body: { id, run: 1 }
  })))
  t.strictSame(runs, Object.fromEntries(ids.map(([, id]) => [id, 1])), 'the handler ran once for each parameter')
  // The same parameter, however the path spells it, is the same request.
  const encoded = await app.inject({ method: 'POST', url: '/orders/a%2Cb', headers: key('same'), payload })
  t.equal(encoded.statusCode, 201)
  t.strictSame(encoded.json(), { id: 'a,b', run: 1 }, '/orders/a%2Cb is /orders/a,b')
  t.equal(encoded.headers['idempotent-replayed'], 'true')
  t.equal(runs['a,b'], 1, 'not run again')
})

t.test('the same key on POST and PATCH of one URL is two records', async (t) => {
  const app = await appFor(t)
  const { runs, count } = counter()
  for (const method of ['POST', 'PATCH'] as const) {
    app.route({ method, url: '/orders/1', config: { idempotency: true }, handler: async (request, reply) => reply.code(201).send({ method, run: count(method) }) })
  }
  await firstThenRetry(t, app, ['POST', 'PATCH'].map((method) => ({
    name: method,
    request: { method: method as InjectOptions['method'], url: '/orders/1', headers: key('same') },
    body: { method, run: 1 }
  })))
  t.strictSame(runs, { POST: 1, PATCH: 1 }, 'each method\'s handler ran once')
})

import diagnostics from 'node:diagnostics_channel'
import t, { type Test } from 'tap'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import pg from 'pg'
import idempotency, {
  MemoryStore,
  PostgresStore,
  RedisStore,
  RequestTracker,
  StoreOperationMissingError,
  type IdempotencyOptions,
  type IdempotencyStore,
  type RequestMessage,
  type SettleMessage,
  type StoreContext
} from '../lib/index.js'
import { logCollector } from './helpers/logs.js'
import { requirePostgres, startPostgres } from './helpers/postgres-server.js'
import { requireRedis, startRedis } from './helpers/redis-server.js'
import { FaultyStore } from './helpers/stores.js'
import { deferred, key, sleep } from './helpers/timing.js'

const CLIENT_KEY = 'client-secret-key-7c1f'

interface Recorded {
  requests: RequestMessage[]
  settles: SettleMessage[]
  store: Array<{ event: string, context: StoreContext }>
}

function subscribe (t: Test): Recorded {
  const recorded: Recorded = { requests: [], settles: [], store: [] }
  const onRequest = (message: unknown): void => { recorded.requests.push(message as RequestMessage) }
  const onSettle = (message: unknown): void => { recorded.settles.push(message as SettleMessage) }
  diagnostics.subscribe('fastify-idempotency.request', onRequest)
  diagnostics.subscribe('fastify-idempotency.settle', onSettle)
  const store = diagnostics.tracingChannel<StoreContext, StoreContext>('fastify-idempotency.store')
  const handlers = Object.fromEntries(['start', 'end', 'asyncStart', 'asyncEnd', 'error'].map((event) => [event, (context: StoreContext) => {
    recorded.store.push({ event, context: { ...context } })
  }])) as unknown as Parameters<typeof store.subscribe>[0]
  store.subscribe(handlers)
  t.teardown(() => {
    diagnostics.unsubscribe('fastify-idempotency.request', onRequest)
    diagnostics.unsubscribe('fastify-idempotency.settle', onSettle)
    store.unsubscribe(handlers)
  })
  return recorded
}

// Everything a message says, but the request it is about (which holds the client's headers).
function withoutRequest (message: RequestMessage | SettleMessage): string {
  const { request: _request, error, ...rest } = message
  return JSON.stringify({ ...rest, error: error instanceof Error ? { message: error.message, code: (error as { code?: string }).code } : error })
}

// A fresh key, its replay, another payload, a duplicate while the first runs, a failure and its retry.
async function scriptedSequence (send: (clientKey: string, payload?: object) => Promise<unknown>, slow: { resolve: () => void }, started: { promise: Promise<void> }): Promise<void> {
  await send(CLIENT_KEY)
  await send(CLIENT_KEY)
  await send(CLIENT_KEY, { other: true })
  const running = send(`${CLIENT_KEY}-slow`, { slow: true })
  await started.promise
  await send(`${CLIENT_KEY}-slow`, { slow: true })
  slow.resolve()
  await running
  await send(`${CLIENT_KEY}-fail`, { fail: true })
  await send(`${CLIENT_KEY}-fail`, { fail: true })
}

async function appWith (t: Test, options: IdempotencyOptions = {}) {
  const logs = logCollector()
  const app = Fastify({ logger: { level: 'debug', stream: logs.stream } })
  await app.register(idempotency, options)
  t.teardown(() => app.close())
  return { app, logs }
}

t.test('publishes each outcome once, with the route, the method and the record, never the client key', async (t) => {
  const recorded = subscribe(t)
  const { app } = await appWith(t, { processingTtl: 60_000 })
  const slow = deferred()
  const started = deferred()
  app.post('/orders/:id', { config: { idempotency: true } }, async (request, reply) => {
    if ((request.body as { slow?: boolean }).slow === true) {
      started.resolve()
      await slow.promise
    }
    if ((request.body as { fail?: boolean }).fail === true) throw new Error('boom')
    return reply.code(201).send({ ok: true })
  })
  const send = async (clientKey: string | undefined, payload: object = {}) => await app.inject({
    method: 'POST', url: '/orders/42', headers: clientKey === undefined ? {} : key(clientKey), payload
  })
  await scriptedSequence(send, slow, started)
  await send(undefined)
  await app.inject({ method: 'POST', url: '/orders/42', headers: { 'idempotency-key': 'bad key' }, payload: {} })

  t.strictSame(recorded.requests.map((message) => message.outcome), [
    'executed', 'replayed', 'mismatch', 'executed', 'conflict', 'executed', 'halted', 'refused', 'refused'
  ])
  for (const message of recorded.requests) {
    t.equal(message.route, '/orders/:id')
    t.equal(message.method, 'POST')
    t.equal(typeof message.request.id, 'string', 'the request itself')
    t.notMatch(withoutRequest(message), CLIENT_KEY, `no ${message.outcome} message holds the client key`)
  }
  const [executed, replayed] = recorded.requests
  t.match(executed?.record, /^[A-Za-z0-9_-]{43}$/, 'the record is a SHA-256 digest')
  t.equal(replayed?.record, executed?.record, 'one record, one name')
  t.equal(recorded.requests.at(-1)?.record, undefined, 'a refused key names no record')
  t.strictSame(recorded.requests.slice(-2).map((message) => (message.error as { code?: string }).code), ['FST_IDEMPOTENCY_KEY_MISSING', 'FST_IDEMPOTENCY_KEY_INVALID'])
  const found = await app.idempotency.find({ method: 'POST', route: '/orders/:id', params: { id: '42' }, key: CLIENT_KEY })
  t.equal(found?.record, executed?.record, 'find names the record as the messages do')

  t.strictSame(recorded.settles.map((message) => [message.outcome, message.reason]), [
    ['completed', 'the handler completed'],
    ['completed', 'the handler completed'],
    ['halted', 'the handler failed']
  ])
  for (const message of recorded.settles) t.notMatch(withoutRequest(message), CLIENT_KEY)
})

t.test('publishes a takeover, an unavailable store and a released or lost settlement', async (t) => {
  const recorded = subscribe(t)
  const store = new FaultyStore(new MemoryStore())
  const { app } = await appWith(t, { store, processingTtl: 30, releaseOnError: true })
  const first = deferred()
  let calls = 0
  app.post('/jobs', { config: { idempotency: true } }, async (request, reply) => {
    calls++
    if (calls === 1) await first.promise
    if (calls === 2) return reply.code(500).send('failed')
    return { calls }
  })
  // The first request's lease lapses (its renewals fail), and a retry takes its record over.
  store.failing = new Set(['update'])
  const stalled = app.inject({ method: 'POST', url: '/jobs', headers: key('job'), payload: {} })
  while ((await app.idempotency.find({ method: 'POST', route: '/jobs', key: 'job' }))?.leaseExpired !== true) await sleep(5)
  // Renewals still fail, so the lapsed lease stays lapsed; releasing is a delete.
  const takeover = await app.inject({ method: 'POST', url: '/jobs', headers: key('job'), payload: {} })
  store.failing.clear()
  t.equal(takeover.statusCode, 500, 'the taking request failed, and its record is released')
  first.resolve()
  await stalled
  store.failing = new Set(['insert'])
  const unavailable = await app.inject({ method: 'POST', url: '/jobs', headers: key('other'), payload: {} })
  t.equal(unavailable.statusCode, 503)
  t.strictSame(recorded.requests.map((message) => message.outcome), ['executed', 'takeover', 'unavailable'])
  t.equal((recorded.requests[2]?.error as { code?: string }).code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
  t.strictSame(recorded.settles.map((message) => message.outcome), ['released', 'lost'])
})

t.test('publishes not-stored when the store fails to save a response', async (t) => {
  const recorded = subscribe(t)
  const store = new FaultyStore(new MemoryStore())
  const { app } = await appWith(t, { store })
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  store.failing = new Set(['update'])
  const response = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(response.statusCode, 200, 'the client still gets its response')
  t.match(recorded.settles, [{ outcome: 'not-stored', error: { message: 'store update failed' } }])
})

t.test('traces every store operation of a fresh key and a replay, and the error of a failing store', async (t) => {
  const recorded = subscribe(t)
  const store = new FaultyStore(new MemoryStore())
  const { app } = await appWith(t, { store })
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  await app.inject({ method: 'POST', url: '/orders', headers: key('traced'), payload: {} })
  await app.inject({ method: 'POST', url: '/orders', headers: key('traced'), payload: {} })
  t.strictSame(recorded.store.map(({ event, context }) => `${context.operation} ${event}`), [
    'insert start', 'insert end', 'insert asyncStart', 'insert asyncEnd',
    'update start', 'update end', 'update asyncStart', 'update asyncEnd',
    'insert start', 'insert end', 'insert asyncStart', 'insert asyncEnd'
  ])
  t.ok(recorded.store.every(({ context }) => context.store === 'FaultyStore'), 'a store without a name is named by its class')
  t.match(recorded.store.at(-1)?.context.result, { inserted: false, record: { state: 'completed' } })
  recorded.store.length = 0
  store.failing = new Set(['insert'])
  await app.inject({ method: 'POST', url: '/orders', headers: key('failing'), payload: {} })
  t.strictSame(recorded.store.map(({ event }) => event), ['start', 'end', 'error', 'asyncStart', 'asyncEnd'])
  t.match(recorded.store[2]?.context, { operation: 'insert', error: { message: 'store insert failed' } })
})

t.test('a memory store traced answers through a promise, and untraced directly', async (t) => {
  const tracker = new RequestTracker(new MemoryStore(), { logger: { warn () {} }, cacheTtl: 1000, processingTtl: 1000, releaseOnError: false })
  t.equal(typeof (tracker.track('a', 'f') as { then?: unknown }).then, 'undefined', 'untraced: the answer itself')
  const recorded = subscribe(t)
  const traced = tracker.track('b', 'f')
  t.equal(typeof (traced as { then?: unknown }).then, 'function', 'traced: a promise')
  t.match(await traced, { status: 'created' })
  t.equal(recorded.store[0]?.context.store, 'memory')
  tracker.close()
})

t.test('logs each outcome once in the request\'s own log, with the route, the outcome and the record', async (t) => {
  const { app, logs } = await appWith(t)
  const slow = deferred()
  const started = deferred()
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    const body = request.body as { slow?: boolean, fail?: boolean }
    if (body.slow === true) {
      started.resolve()
      await slow.promise
    }
    if (body.fail === true) throw new Error('boom')
    return reply.code(201).send({ secret: 'response-body-secret' })
  })
  const send = async (clientKey: string, payload: object = {}) => await app.inject({ method: 'POST', url: '/orders', headers: key(clientKey), payload })
  await scriptedSequence(send, slow, started)
  const ours = logs.lines.filter((line) => line.idempotency !== undefined)
  const outcomes = ours.map((line) => [(line.idempotency as { outcome: string }).outcome, line.level])
  t.strictSame(outcomes, [
    ['executed', 20], ['replayed', 30], ['mismatch', 40], ['executed', 20], ['conflict', 30], ['executed', 20],
    ['halted', 40], ['halted', 40]
  ], 'replays and conflicts at info, mismatches and halts at warn, the rest at debug')
  const halt = ours[6]
  t.match(halt, { msg: 'idempotency record halted: the handler failed', idempotency: { route: '/orders', record: /^[A-Za-z0-9_-]{43}$/ }, reqId: String })
  t.equal(ours[7]?.msg, 'idempotency: refused, the first request with this key halted and its outcome is unknown')
  const replay = ours[1]
  t.equal(replay?.reqId, logs.lines.find((line) => line.msg === 'incoming request' && line.reqId === replay?.reqId)?.reqId, 'in the request\'s own log')
  const everything = logs.lines.map((line) => JSON.stringify(line)).join('\n')
  t.notMatch(everything, CLIENT_KEY, 'no log line holds the client key')
  t.notMatch(everything, 'response-body-secret', 'no log line holds a response body')
})

t.test('logs a store failure at error with the operation', async (t) => {
  const store = new FaultyStore(new MemoryStore())
  const { app, logs } = await appWith(t, { store })
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  app.post('/failing', { config: { idempotency: { releaseOnError: true } } }, async (request, reply) => await reply.code(500).send('failed'))
  store.failing = new Set(['insert'])
  await app.inject({ method: 'POST', url: '/orders', headers: key(CLIENT_KEY), payload: {} })
  t.match(logs.lines.find((line) => line.level === 50 && line.idempotency !== undefined), {
    msg: 'idempotency store failed while tracking the request', operation: 'insert', idempotency: { outcome: 'unavailable', route: '/orders' }
  })
  store.failing = new Set(['update'])
  await app.inject({ method: 'POST', url: '/orders', headers: key(`${CLIENT_KEY}-2`), payload: {} })
  t.match(logs.lines.filter((line) => line.level === 50).at(-1), { operation: 'update', idempotency: { outcome: 'not-stored' } })
  store.failing = new Set(['delete'])
  await app.inject({ method: 'POST', url: '/failing', headers: key(`${CLIENT_KEY}-3`), payload: {} })
  t.match(logs.lines.filter((line) => line.level === 50).at(-1), { operation: 'delete', idempotency: { outcome: 'not-stored' } }, 'a release that failed')
  t.notMatch(logs.lines.map((line) => JSON.stringify(line)).join('\n'), CLIENT_KEY)
})

interface StoreCase {
  name: string
  guard: (t: Test) => boolean
  open: (t: Test) => Promise<IdempotencyStore>
}

const storeCases: StoreCase[] = [
  { name: 'the memory store', guard: () => true, open: async () => new MemoryStore() },
  {
    name: 'Redis',
    guard: requireRedis,
    open: async (t) => {
      const server = await startRedis()
      const client = new Redis({ host: '127.0.0.1', port: server.port })
      t.teardown(async () => { client.disconnect(); await server.stop() })
      return new RedisStore({ client })
    }
  },
  {
    name: 'PostgreSQL',
    guard: requirePostgres,
    open: async (t) => {
      const server = await startPostgres()
      const pool = new pg.Pool({ connectionString: server.connectionString, max: 5 })
      t.teardown(async () => { await pool.end(); await server.destroy() })
      return new PostgresStore({ pool, table: 'observability_requests', createTable: true })
    }
  }
]

for (const { name, guard, open } of storeCases) {
  t.test(`an operator finds, lists and forgets a halted request, after which its retry runs once, in ${name}`, async (t) => {
    if (!guard(t)) return
    const store = await open(t)
    const { app, logs } = await appWith(t, { store, scope: (request) => request.headers['x-user'] as string })
    let runs = 0
    app.post('/orders/:id', { config: { idempotency: true } }, async (request, reply) => {
      runs++
      if (runs === 1) throw new Error('the payment provider timed out')
      return reply.code(201).send({ charged: true })
    })
    const send = async () => await app.inject({ method: 'POST', url: '/orders/42', headers: { ...key(CLIENT_KEY), 'x-user': 'user-1' }, payload: { amount: 5 } })
    t.equal((await send()).statusCode, 500)
    t.equal((await send()).json().code, 'FST_IDEMPOTENCY_HALTED', 'stuck: every retry is told it halted')
    const identity = { method: 'POST', route: '/orders/:id', params: { id: '42' }, key: CLIENT_KEY, scope: 'user-1' }
    const found = await app.idempotency.find(identity)
    t.match(found, { state: 'halted', leaseExpired: false, statusCode: undefined, createdAt: Number, record: /^[A-Za-z0-9_-]{43}$/ })
    t.ok((found?.expiresAt as number) > Date.now())
    t.equal(await app.idempotency.find({ ...identity, scope: 'user-2' }), undefined, 'another scope names another request')
    const listed = await app.idempotency.list({ state: 'halted', limit: 10 })
    t.equal(listed.records.length, 1)
    t.match(listed.records[0], { state: 'halted', identity: { method: 'POST', route: '/orders/:id', params: { id: '42' }, key: CLIENT_KEY, scope: 'user-1' } })
    t.equal((await app.idempotency.list({ state: 'lapsed', limit: 10 })).records.length, 0)
    t.equal(await app.idempotency.forget(listed.records[0]?.identity ?? identity), true, 'the listed identity names the record')
    t.match(logs.lines.find((line) => line.msg === 'idempotency record forgotten by an operator'), { level: 40, record: found?.record, route: '/orders/:id' })
    t.equal(await app.idempotency.find(identity), undefined)
    const retry = await send()
    t.equal(retry.statusCode, 201)
    t.equal(runs, 2, 'the retry ran the handler once more')
    const completed = await app.idempotency.find(identity)
    t.match(completed, { state: 'completed', statusCode: 201, bodySize: Buffer.byteLength('{"charged":true}'), leaseExpiresAt: undefined })
    t.equal((await send()).headers['idempotent-replayed'], 'true')
    t.equal(runs, 2)
    t.equal(await app.idempotency.forget(identity), true, 'a completed record is forgotten too')
    t.equal(await app.idempotency.forget(identity), false, 'then there is none')
  })
}

t.test('a running request shows its lease to an operator, and a custom store without remove or list says so', async (t) => {
  const { app } = await appWith(t, { processingTtl: 60_000 })
  const running = deferred()
  app.post('/orders', { config: { idempotency: true } }, async () => {
    await running.promise
    return { ok: true }
  })
  const first = app.inject({ method: 'POST', url: '/orders', headers: key('running'), payload: {} })
  await sleep(10)
  const found = await app.idempotency.find({ method: 'POST', route: '/orders', key: 'running' })
  t.match(found, { state: 'processing', leaseExpired: false, leaseExpiresAt: Number })
  t.ok((found?.leaseExpiresAt as number) > Date.now())
  running.resolve()
  await first

  const bare: IdempotencyStore = {
    insert: async () => ({ inserted: true }),
    lookup: async () => undefined,
    update: async () => true,
    delete: async () => true,
    prune: async () => 0
  }
  const tracker = new RequestTracker(bare, { logger: { warn () {} }, cacheTtl: 1000, processingTtl: 1000, releaseOnError: false })
  t.throws(() => tracker.forget({ method: 'POST', route: '/', key: 'k' }), StoreOperationMissingError)
  t.throws(() => tracker.list({ limit: 1 }), { code: 'FST_IDEMPOTENCY_STORE_OPERATION_MISSING', message: /no list method/ })
  t.throws(() => app.idempotency.list({ limit: 0 }), { code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: /limit must be a positive integer/ })
  t.throws(() => app.idempotency.list({ limit: 1, state: 'done' as never }), { message: /state must be 'halted', 'lapsed' or undefined/ })
})

t.test('the memory store lists lapsed leases in the order they were created, and a record created again comes last', async (t) => {
  let clock = 1_000_000
  const store = new MemoryStore({ now: () => clock })
  const record = (createdAt: number) => ({ fingerprint: 'f', owner: `o${createdAt}`, expiresAt: clock + 60_000, lease: 10, takeOverExpiredLease: false, createdAt })
  for (const at of [1, 2, 3]) store.insert(`k${at}`, record(at))
  clock += 20
  const first = store.list({ limit: 2 })
  t.strictSame(first.records.map((entry) => entry.key), ['k1', 'k2'])
  t.type(first.cursor, 'string')
  t.strictSame(store.list({ limit: 2, cursor: first.cursor }).records.map((entry) => entry.key), ['k3'])
  // An operator forgets k1; its client's retry creates it again, and its lease lapses too.
  t.equal(store.remove('k1'), true)
  store.insert('k1', record(4))
  clock += 20
  const next = store.list({ limit: 5, cursor: first.cursor })
  t.strictSame(next.records.map((entry) => entry.key), ['k3', 'k1'], 'nothing after the cursor is skipped')
  t.equal(next.cursor, undefined)
  t.strictSame(store.list({ limit: 5, state: 'halted' }).records, [])
})

t.test('an operator never removes a request that still runs, and the store channel never shows a client key', async (t) => {
  const recorded = subscribe(t)
  const { app } = await appWith(t, { processingTtl: 60_000 })
  const running = deferred()
  app.post('/orders', { config: { idempotency: true } }, async () => {
    await running.promise
    return { ok: true }
  })
  const first = app.inject({ method: 'POST', url: '/orders', headers: key(CLIENT_KEY), payload: {} })
  await sleep(10)
  const identity = { method: 'POST', route: '/orders', key: CLIENT_KEY }
  t.equal(await app.idempotency.forget(identity), false, 'a live lease is left')
  t.equal((await app.idempotency.find(identity))?.state, 'processing')
  running.resolve()
  t.equal((await first).statusCode, 200)
  t.equal((await app.idempotency.find(identity))?.state, 'completed', 'its owner completed it')
  await app.idempotency.list({ limit: 10 })
  const contexts = recorded.store.map(({ context }) => JSON.stringify(context))
  t.ok(contexts.some((context) => context.includes('"operation":"lookup"')) && contexts.some((context) => context.includes('"operation":"list"')))
  t.notMatch(contexts.join('\n'), CLIENT_KEY, 'no traced result holds the client key')
})

t.test('a logger without isLevelEnabled gets each outcome at its level', async (t) => {
  const lines: Array<[string, unknown, string]> = []
  const logger = {
    level: 'info',
    child () { return logger },
    ...Object.fromEntries(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((level) => [level, (fields: unknown, message: string) => { lines.push([level, fields, message]) }]))
  }
  const app = Fastify({ loggerInstance: logger as never })
  await app.register(idempotency)
  t.teardown(() => app.close())
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  await app.inject({ method: 'POST', url: '/orders', headers: key('plain-logger'), payload: {} })
  await app.inject({ method: 'POST', url: '/orders', headers: key('plain-logger'), payload: {} })
  t.match(lines.filter(([, fields]) => (fields as { idempotency?: unknown })?.idempotency !== undefined), [
    ['debug', { idempotency: { outcome: 'executed' } }], ['info', { idempotency: { outcome: 'replayed' } }]
  ])
})

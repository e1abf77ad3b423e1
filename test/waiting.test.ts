import diagnostics from 'node:diagnostics_channel'
import { connect, type AddressInfo } from 'node:net'
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import pg from 'pg'
import idempotency, { MemoryStore, PostgresStore, RedisStore, RequestTracker, type IdempotencyOptions, type IdempotencyStore } from '../lib/index.js'
import { logCollector } from './helpers/logs.js'
import { requirePostgres, startPostgres } from './helpers/postgres-server.js'
import { requireRedis, startRedis } from './helpers/redis-server.js'
import { FaultyStore } from './helpers/stores.js'
import { post } from './helpers/shared-store.js'
import { deferred, key, sleep } from './helpers/timing.js'
import { waiters } from './helpers/waiting.js'

async function appOn (t: Test, options: IdempotencyOptions, logger: object | boolean = false): Promise<FastifyInstance> {
  const app = Fastify({ logger })
  await app.register(idempotency, options)
  t.teardown(() => app.close())
  return app
}

// Three instances on real ports sharing one store, 200 concurrent requests with one key: the
// handler runs once and every duplicate waits for its response.
async function everyDuplicateGetsTheResponse (t: Test, stores: () => IdempotencyStore | undefined): Promise<void> {
  let runs = 0
  const ports: number[] = []
  for (let index = 0; index < 3; index++) {
    const store = stores()
    const app = await appOn(t, { wait: 5000, ...(store === undefined ? {} : { store }) })
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
      runs++
      await sleep(300)
      return reply.code(201).send({ id: 'ord_1', instance: index })
    })
    await app.listen({ host: '127.0.0.1', port: 0 })
    ports.push((app.server.address() as AddressInfo).port)
  }
  const idempotencyKey = `waited-${process.pid}-${Date.now()}`
  const answers = await Promise.all(Array.from({ length: 200 }, (_, index) => post(ports[index % 3] as number, idempotencyKey)))
  t.equal(runs, 1, 'the handler ran once')
  t.strictSame([...new Set(answers.map((answer) => answer.status))], [201], 'no 409: every duplicate waited')
  t.equal(new Set(answers.map((answer) => answer.body)).size, 1, 'one body, byte for byte')
  t.equal(answers.filter((answer) => !answer.replayed).length, 1, 'one original, 199 replays')
}

t.test('200 duplicates in one process wait for the first response, on the memory store', async (t) => {
  // One store for the three instances: one process.
  const store = new MemoryStore()
  await everyDuplicateGetsTheResponse(t, () => store)
})

t.test('200 duplicates over 3 instances sharing Redis wait for the first response', async (t) => {
  if (!requireRedis(t)) return
  const server = await startRedis()
  const clients: Redis[] = []
  t.teardown(async () => {
    for (const client of clients) client.disconnect()
    await server.stop()
  })
  await everyDuplicateGetsTheResponse(t, () => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    clients.push(client)
    return new RedisStore({ client })
  })
})

t.test('200 duplicates over 3 instances sharing PostgreSQL wait for the first response', async (t) => {
  if (!requirePostgres(t)) return
  const server = await startPostgres()
  const pool = new pg.Pool({ connectionString: server.connectionString, max: 20 })
  // The server's end tells idle clients first.
  pool.on('error', () => {})
  t.teardown(async () => {
    await pool.end()
    await server.destroy()
  })
  await new PostgresStore({ pool, table: 'waiting_requests', createTable: true }).prune()
  await everyDuplicateGetsTheResponse(t, () => new PostgresStore({ pool, table: 'waiting_requests' }))
})

async function owned (t: Test, options: IdempotencyOptions, behave: (runs: number) => Promise<unknown>) {
  const logs = logCollector()
  const app = await appOn(t, options, { level: 'warn', stream: logs.stream })
  const state = { runs: 0 }
  const first = deferred()
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    state.runs++
    first.resolve()
    const result = await behave(state.runs)
    return reply.code(201).send(result)
  })
  const send = async (payload: object = { amount: 1 }) => await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload })
  // Once the first request runs, and once `count` duplicates wait.
  const started = first.promise
  const waiting = async (count: number): Promise<void> => {
    while (app.idempotency.waiting < count) await sleep(1)
  }
  return { app, state, send, logs, started, waiting }
}

t.test('a duplicate gets 409 with Retry-After when wait passes first, and another payload gets 422 at once', async (t) => {
  const first = deferred()
  const { state, send, started } = await owned(t, { wait: 50 }, async () => { await first.promise; return { ok: true } })
  const running = send()
  await started
  const mismatch = await send({ amount: 2 })
  t.equal(mismatch.json().code, 'FST_IDEMPOTENCY_MISMATCH', 'never waits')
  const conflict = await send()
  t.equal(conflict.json().code, 'FST_IDEMPOTENCY_CONFLICT')
  t.equal(conflict.headers['retry-after'], '1')
  first.resolve()
  t.equal((await running).statusCode, 201)
  t.equal(state.runs, 1)
})

t.test('a waiter gets 500 halted when the first request fails, and with releaseOnError exactly one waiter runs', async (t) => {
  for (const releaseOnError of [false, true]) {
    const first = deferred()
    const { state, send, started, waiting } = await owned(t, { wait: 5000, releaseOnError }, async (runs) => {
      if (runs === 1) {
        await first.promise
        throw new Error('the provider failed')
      }
      return { run: runs }
    })
    const running = send()
    await started
    const waiters = Array.from({ length: 5 }, async () => await send())
    await waiting(5)
    first.resolve()
    t.equal((await running).statusCode, 500)
    const answers = await Promise.all(waiters)
    if (releaseOnError) {
      t.equal(state.runs, 2, 'released: one waiter ran the handler')
      t.strictSame(answers.map((answer) => answer.statusCode), [201, 201, 201, 201, 201])
      t.equal(new Set(answers.map((answer) => answer.body)).size, 1, 'the others got its response')
    } else {
      t.equal(state.runs, 1)
      t.strictSame(answers.map((answer) => answer.json().code), Array(5).fill('FST_IDEMPOTENCY_HALTED'))
    }
  }
})

t.test('a waiter is told halted when the first request\'s lease lapses, or takes it over once with releaseOnError', async (t) => {
  for (const releaseOnError of [false, true]) {
    const store = new MemoryStore()
    const stuck = deferred()
    const started = deferred()
    // The first instance is closed mid-request, as a killed one: it renews its lease no more.
    const dead = await owned(t, { store, processingTtl: 30, releaseOnError }, async () => {
      started.resolve()
      await stuck.promise
      return { run: 'dead' }
    })
    const live = await owned(t, { store, wait: 5000, processingTtl: 30, releaseOnError }, async (runs) => ({ run: runs }))
    const running = dead.send()
    await started.promise
    await dead.app.close()
    const answers = await Promise.all(Array.from({ length: 3 }, async () => await live.send()))
    if (releaseOnError) {
      t.equal(live.state.runs, 1, 'one waiter took the lapsed record over')
      t.strictSame(answers.map((answer) => answer.statusCode), [201, 201, 201])
      t.equal(answers.filter((answer) => answer.headers['idempotent-replayed'] === 'true').length, 2, 'the others got its response')
    } else {
      t.equal(live.state.runs, 0)
      t.strictSame(answers.map((answer) => answer.json().code), Array(3).fill('FST_IDEMPOTENCY_HALTED'))
    }
    stuck.resolve()
    await running
  }
})

t.test('a store without notifications is polled, and a store failure while waiting is a 503', async (t) => {
  const store = new FaultyStore(new MemoryStore())
  t.equal((store as IdempotencyStore).watch, undefined, 'this store cannot notify')
  const first = deferred()
  const { send, started, waiting } = await owned(t, { store, wait: 5000 }, async () => { await first.promise; return { ok: true } })
  const running = send()
  await started
  const polled = send()
  await waiting(1)
  first.resolve()
  t.equal((await running).statusCode, 201)
  const answer = await polled
  t.equal(answer.statusCode, 201)
  t.equal(answer.headers['idempotent-replayed'], 'true', 'a fallback lookup found the response')

  const second = deferred()
  const otherStore = new FaultyStore(new MemoryStore())
  const other = await owned(t, { store: otherStore, wait: 5000 }, async () => { await second.promise; return { ok: true } })
  const secondRunning = other.send()
  await other.started
  const failing = other.send()
  await other.waiting(1)
  otherStore.failing = new Set(['insert'])
  const unavailable = await failing
  t.equal(unavailable.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
  t.equal(unavailable.headers['retry-after'], '5')
  otherStore.failing.clear()
  second.resolve()
  await secondRunning
})

t.test('maxWaiting bounds the waiters; a waiter whose client went away frees its slot', async (t) => {
  const first = deferred()
  const logs = logCollector()
  const app = await appOn(t, { wait: 60_000, maxWaiting: 1 }, { level: 'warn', stream: logs.stream })
  let runs = 0
  const started = deferred()
  app.post('/orders', { config: { idempotency: true } }, async () => {
    runs++
    started.resolve()
    await first.promise
    return { ok: true }
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as AddressInfo).port
  const running = post(port, 'crowded')
  await started.promise
  // A waiter over a socket that goes away.
  const socket = connect({ host: '127.0.0.1', port })
  const body = '{"amount":100}'
  socket.write(`POST /orders HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nIdempotency-Key: crowded\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await waiters(app, 1)
  const full = await post(port, 'crowded')
  t.equal(full.status, 409, 'past maxWaiting, a duplicate is answered at once')
  t.equal((await post(port, 'crowded')).status, 409)
  t.equal(logs.lines.filter((line) => /maxWaiting duplicates wait already/.test(line.msg)).length, 1, 'and a warning is logged once')
  socket.destroy()
  await waiters(app, 0)
  const waiting = post(port, 'crowded')
  await waiters(app, 1)
  first.resolve()
  const answer = await waiting
  t.equal(answer.status, 200, 'the slot was freed: this duplicate waited')
  t.equal(answer.replayed, true)
  t.equal((await running).status, 200)
  t.equal(runs, 1)
})

t.test('app.close() ends every wait at once with 503 and leaves no wait behind', async (t) => {
  const first = deferred()
  const app = Fastify()
  await app.register(idempotency, { wait: 2_147_483_647 })
  const started = deferred()
  app.post('/orders', { config: { idempotency: true } }, async () => {
    started.resolve()
    await first.promise
    return { ok: true }
  })
  const running = app.inject({ method: 'POST', url: '/orders', headers: key('closing'), payload: {} })
  await started.promise
  const waiters = Array.from({ length: 3 }, async () => await app.inject({ method: 'POST', url: '/orders', headers: key('closing'), payload: {} }))
  while (app.idempotency.waiting < 3) await sleep(1)
  const tracker = app.idempotency
  await app.close()
  const answers = await Promise.all(waiters)
  t.strictSame(answers.map((answer) => [answer.statusCode, answer.json().code, answer.headers['retry-after']]), Array(3).fill([503, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE', '5']))
  t.equal(tracker.waiting, 0, 'no waiter is left')
  first.resolve()
  await running
})

t.test('a tracker gives back a record created for waiters that all left', async (t) => {
  const store = new FaultyStore(new MemoryStore())
  const tracker = new RequestTracker(store, { logger: { warn () {} }, cacheTtl: 60_000, processingTtl: 60_000, releaseOnError: false })
  t.teardown(() => tracker.close())
  const first = await tracker.track('k', 'f')
  store.delays.set('insert', 30)
  const controller = new AbortController()
  const waited = tracker.wait('k', 'f', { running: { status: 'processing', expiresAt: 0 }, ms: 60_000, signal: controller.signal })
  // While the wait's first check is on its way to the store, the owner releases and the waiter
  // leaves: the check creates a record that no one is left to run.
  while (store.calls.filter((call) => call.operation === 'insert').length < 2) await sleep(1)
  await tracker.release('k', (first as { owner: string }).owner)
  controller.abort()
  t.equal((await waited).status, 'processing', 'an aborted wait answers what track said')
  let record = store.inner.lookup('k')
  for (let attempt = 0; attempt < 100 && record !== undefined; attempt++) {
    await sleep(10)
    record = store.inner.lookup('k')
  }
  t.equal(record, undefined, 'the record the last check created is given back: nothing holds the key')
  t.equal(tracker.waiting, 0)
})

t.test('wait and maxWaiting are checked at registration and at route declaration, naming the option', async (t) => {
  for (const [options, name] of [[{ wait: -1 }, 'wait'], [{ wait: 2 ** 31 }, 'wait'], [{ wait: 1.5 }, 'wait'], [{ maxWaiting: -1 }, 'maxWaiting']] as const) {
    const app = Fastify()
    await t.rejects(async () => { await app.register(idempotency, options as IdempotencyOptions) }, { code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: new RegExp(name) })
    await app.close()
  }
  const app = await appOn(t, {})
  t.throws(() => app.post('/orders', { config: { idempotency: { wait: 'long' as never } } }, async () => ({})), {
    code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: /route POST \/orders: config\.idempotency\.wait/
  })
})

// A store whose answers take a while and that notifies: a change told while a check is on its way.
class SlowWatchedStore extends FaultyStore {
  watch (key: string, listener: () => void): () => void {
    return this.inner.watch(key, listener)
  }
}

t.test('a change told while a check runs is checked again, and a failure to give back an unclaimed record is logged', async (t) => {
  const store = new SlowWatchedStore(new MemoryStore())
  const warnings: string[] = []
  const tracker = new RequestTracker(store, { logger: { warn (_object, message) { warnings.push(message) } }, cacheTtl: 60_000, processingTtl: 60_000, releaseOnError: false })
  t.teardown(() => tracker.close())
  const first = await tracker.track('k', 'f') as { owner: string }
  const other = await tracker.track('other', 'f') as { owner: string }
  store.delays.set('insert', 30)
  const controller = new AbortController()
  const waited = tracker.wait('k', 'f', { running: { status: 'processing', expiresAt: 0 }, ms: 60_000, signal: controller.signal })
  while (store.calls.filter((call) => call.operation === 'insert').length < 3) await sleep(1)
  // Another key's change tells nobody here; this key's, while its check is on the way, is seen after it.
  store.inner.update('other', other.owner, { state: 'halted', expiresAt: Date.now() + 60_000 })
  store.inner.update('k', first.owner, { state: 'completed', response: { statusCode: 201, headers: {}, body: 'done' }, expiresAt: Date.now() + 60_000 })
  t.match(await waited, { status: 'completed', response: { statusCode: 201 } })

  // A record created for waiters that all left, which the store then fails to give back.
  const again = await tracker.track('next', 'f') as { owner: string }
  const leaving = new AbortController()
  const left = tracker.wait('next', 'f', { running: { status: 'processing', expiresAt: 0 }, ms: 60_000, signal: leaving.signal })
  const inserts = store.calls.filter((call) => call.operation === 'insert').length
  while (store.calls.filter((call) => call.operation === 'insert').length === inserts) await sleep(1)
  store.inner.delete('next', again.owner)
  store.failing = new Set(['delete'])
  leaving.abort()
  await left
  while (warnings.length === 0) await sleep(5)
  t.match(warnings, [/failed to release a record no waiter claimed/])
})

t.test('a handler that answers with a plain value is stored and replayed', async (t) => {
  const app = await appOn(t, { wait: 100 })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, function () {
    runs++
    return { sync: true }
  })
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('plain'), payload: {} })
  const retry = await app.inject({ method: 'POST', url: '/orders', headers: key('plain'), payload: {} })
  t.same([first.json(), retry.json(), retry.headers['idempotent-replayed'], runs], [{ sync: true }, { sync: true }, 'true', 1])
})

t.test('a duplicate whose client left while the store was asked does not wait', async (t) => {
  const messages: Array<{ outcome: string, waited?: number }> = []
  const listener = (message: unknown): void => { messages.push(message as { outcome: string }) }
  diagnostics.subscribe('fastify-idempotency.request', listener)
  t.teardown(() => { diagnostics.unsubscribe('fastify-idempotency.request', listener) })
  const first = deferred()
  const started = deferred()
  const app = await appOn(t, {
    wait: 60_000,
    scope: async (request) => {
      if (request.headers['x-slow'] !== undefined) await sleep(50)
      return 'user'
    }
  })
  app.post('/orders', { config: { idempotency: true } }, async () => {
    started.resolve()
    await first.promise
    return { ok: true }
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as AddressInfo).port
  const running = post(port, 'gone-early')
  await started.promise
  const socket = connect({ host: '127.0.0.1', port }, () => {
    socket.end('POST /orders HTTP/1.1\r\nHost: a\r\nX-Slow: 1\r\nContent-Type: application/json\r\nIdempotency-Key: gone-early\r\nContent-Length: 14\r\n\r\n{"amount":100}')
    socket.destroy()
  })
  while (messages.length < 2) await sleep(5)
  t.match(messages[1], { outcome: 'conflict' }, 'answered at once')
  t.equal(app.idempotency.waiting, 0)
  first.resolve()
  t.equal((await running).status, 200)
})

import t from 'tap'
import Fastify from 'fastify'
import idempotency, { MemoryStore } from '../lib/index.js'
import { buildApp } from './helpers/app.js'
import { logCollector } from './helpers/logs.js'
import { FaultyStore } from './helpers/stores.js'
import { deferred } from './helpers/timing.js'

t.test('app.close() leaves no timer behind', async (t) => {
  // Unref'd timers do not show in process.getActiveResourcesInfo(): watch them being made instead.
  const live = new Set<unknown>()
  const { setInterval: realSetInterval, clearInterval: realClearInterval } = globalThis
  globalThis.setInterval = ((...args: Parameters<typeof setInterval>) => {
    const timer = realSetInterval(...args)
    live.add(timer)
    return timer
  }) as typeof setInterval
  globalThis.clearInterval = ((timer?: Parameters<typeof clearInterval>[0]) => {
    live.delete(timer)
    realClearInterval(timer)
  }) as typeof clearInterval
  t.teardown(() => {
    globalThis.setInterval = realSetInterval
    globalThis.clearInterval = realClearInterval
  })
  for (const [name, store] of [['a store outside this process', new FaultyStore()], ['the memory store', undefined]] as const) {
    const app = await buildApp({ store, prune: 1000, processingTtl: 60 })
    const running = deferred()
    const started = deferred()
    app.post('/orders', { config: { idempotency: true } }, async () => {
      started.resolve()
      await running.promise
      return {}
    })
    const abandoned = deferred()
    app.post('/never', { config: { idempotency: true } }, async () => { abandoned.resolve(); await new Promise(() => {}) })
    await app.ready()
    t.equal(live.size, 1, `${name}: the prune timer runs while the app is up`)
    const response = app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'k' }, payload: {} })
    await started.promise
    t.equal(live.size, 2, `${name}: a running request's lease renewal timer too`)
    running.resolve()
    t.equal((await response).statusCode, 200)
    t.equal(live.size, 1, `${name}: the renewal timer is cleared once the request is settled`)
    void app.inject({ method: 'POST', url: '/never', headers: { 'idempotency-key': 'n' }, payload: {} })
    await abandoned.promise
    await app.close()
    t.equal(live.size, 0, `${name}: every timer is cleared on close, that of a request still running too`)
  }
})

t.test('prunes the store every prune ms, and stops on close', async (t) => {
  const store = new FaultyStore()
  const app = await buildApp({ store, prune: 15 })
  await app.ready()
  await new Promise((resolve) => setTimeout(resolve, 60))
  const pruned = store.calls.filter((call) => call.operation === 'prune').length
  t.ok(pruned >= 2, `pruned ${pruned} times in 60 ms`)
  await app.close()
  await new Promise((resolve) => setTimeout(resolve, 40))
  t.equal(store.calls.filter((call) => call.operation === 'prune').length, pruned, 'no prune after close')
})

t.test('logs a failed prune as a warning and keeps going', async (t) => {
  const store = new FaultyStore()
  store.failing.add('prune')
  const logs = logCollector()
  const app = Fastify({ logger: { level: 'warn', stream: logs.stream } })
  await app.register(idempotency, { store, prune: 10 })
  await app.ready()
  await new Promise((resolve) => setTimeout(resolve, 50))
  t.ok(logs.find(40, 'prune failed'))
  t.ok(store.calls.filter((call) => call.operation === 'prune').length >= 2)
  await app.close()
})

t.test('prune removes expired records from the memory store', async (t) => {
  let clock = 1_000_000
  const store = new MemoryStore({ now: () => clock })
  const app = await buildApp({ store })
  const removed: number[] = []
  await store.insert('a', { fingerprint: 'f', owner: 'o', expiresAt: clock + 10, lease: 10, takeOverExpiredLease: false })
  clock += 20
  removed.push(await app.idempotency.prune())
  removed.push(await app.idempotency.prune())
  t.same(removed, [1, 0])
  await app.close()
})

t.test('decorates the instance with the tracker and its store', async (t) => {
  const store = new MemoryStore()
  const app = await buildApp({ store })
  t.equal(app.idempotency.store, store)
  await app.close()
})

t.test('gives the default memory store the app logger for eviction warnings', async (t) => {
  const logs = logCollector()
  const app = Fastify({ logger: { level: 'warn', stream: logs.stream } })
  await app.register(idempotency)
  const store = app.idempotency.store as MemoryStore
  t.equal(store.maxBytes, 64 * 1024 * 1024)
  const big = Buffer.alloc(40 * 1024 * 1024)
  for (const key of ['a', 'b']) {
    await store.insert(key, { fingerprint: 'f', owner: key, expiresAt: Date.now() + 60_000, lease: 1000, takeOverExpiredLease: false })
    await store.update(key, key, { state: 'completed', response: { statusCode: 200, headers: {}, body: big }, expiresAt: Date.now() + 60_000 })
  }
  t.ok(logs.find(40, 'memory store is full'))
  t.equal(await store.lookup('a'), undefined, 'the oldest completed record was evicted')
  await app.close()
})

t.test('the plugin declares its name and Fastify version for fastify-plugin', async (t) => {
  const meta = (idempotency as unknown as Record<symbol, { name: string, fastify: string }>)[Symbol.for('plugin-meta')]
  t.same({ name: meta?.name, fastify: meta?.fastify }, { name: 'fastify-idempotency', fastify: '5.x' })
})

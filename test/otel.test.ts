import diagnostics from 'node:diagnostics_channel'
import { createRequire } from 'node:module'
import t from 'tap'
import { metrics } from '@opentelemetry/api'
import { DataPointType, MeterProvider, MetricReader, type MetricData } from '@opentelemetry/sdk-metrics'
import type { IdempotencyStore } from '../lib/index.js'
import { instrumentIdempotency } from '../lib/otel.js'
import { buildApp } from './helpers/app.js'
import { FaultyStore } from './helpers/stores.js'
import { deferred, key } from './helpers/timing.js'

const { version } = createRequire(import.meta.url)('../package.json') as { version: string }

// A reader the test collects from when it chooses, instead of on a timer.
class CollectingReader extends MetricReader {
  protected override async onForceFlush (): Promise<void> {}
  protected override async onShutdown (): Promise<void> {}
}

interface Collected {
  /** Each metric by name. */
  metrics: Map<string, MetricData>
  /** The scope (meter) of each metric, by metric name. */
  scopes: Map<string, { name: string, version?: string }>
}

function meterProvider (): { provider: MeterProvider, collect: () => Promise<Collected> } {
  const reader = new CollectingReader()
  const provider = new MeterProvider({ readers: [reader] })
  return {
    provider,
    async collect () {
      const { resourceMetrics, errors } = await reader.collect()
      if (errors.length > 0) throw errors[0]
      const collected: Collected = { metrics: new Map(), scopes: new Map() }
      for (const scope of resourceMetrics.scopeMetrics) {
        for (const metric of scope.metrics) {
          collected.metrics.set(metric.descriptor.name, metric)
          collected.scopes.set(metric.descriptor.name, scope.scope)
        }
      }
      return collected
    }
  }
}

// A counter's values, or a histogram's counts, keyed by the given attributes' values joined with spaces.
function byAttributes (metric: MetricData | undefined, attributes: string[]): Record<string, number> {
  const values: Record<string, number> = {}
  for (const point of metric?.dataPoints ?? []) {
    const name = attributes.map((attribute) => point.attributes[attribute]).filter((value) => value !== undefined).join(' ')
    values[name] = typeof point.value === 'number' ? point.value : (point.value as { count: number }).count
  }
  return values
}

const requestAttributes = ['idempotency.outcome', 'http.route', 'http.request.method', 'error.type']
const settleAttributes = ['idempotency.settle.outcome', 'http.route', 'http.request.method', 'error.type']
const storeAttributes = ['idempotency.store.operation', 'idempotency.store', 'error.type']

// A store whose every operation rejects with `reason`.
function brokenStore (name: string, reason: unknown): IdempotencyStore {
  const fail = async (): Promise<never> => await Promise.reject(reason)
  return { name, insert: fail, lookup: fail, update: fail, delete: fail, prune: fail }
}

t.test('counts every outcome of a scripted sequence and times every store operation', async (t) => {
  const { provider, collect } = meterProvider()
  const stop = instrumentIdempotency({ meterProvider: provider })
  t.teardown(stop)

  const app = await buildApp({ required: false })
  let orders = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ order: ++orders }))
  const entered = deferred()
  const gate = deferred()
  app.post('/slow', { config: { idempotency: true } }, async () => {
    entered.resolve()
    await gate.promise
    return { slow: true }
  })
  let crashes = 0
  app.post('/crash', { config: { idempotency: true } }, async () => {
    crashes++
    throw new Error('boom')
  })

  const fresh = await app.inject({ method: 'POST', url: '/orders', headers: key('a'), payload: { n: 1 } })
  t.equal(fresh.statusCode, 200)
  t.same(fresh.json(), { order: 1 })
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('a'), payload: { n: 1 } })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.same(replay.json(), { order: 1 })

  const running = app.inject({ method: 'POST', url: '/slow', headers: key('b'), payload: {} })
  await entered.promise
  const conflict = await app.inject({ method: 'POST', url: '/slow', headers: key('b'), payload: {} })
  t.equal(conflict.statusCode, 409)
  gate.resolve()
  t.equal((await running).statusCode, 200)

  const mismatch = await app.inject({ method: 'POST', url: '/orders', headers: key('a'), payload: { n: 2 } })
  t.equal(mismatch.statusCode, 422)
  t.equal((await app.inject({ method: 'POST', url: '/crash', headers: key('c'), payload: {} })).statusCode, 500)
  const halted = await app.inject({ method: 'POST', url: '/crash', headers: key('c'), payload: {} })
  t.equal(halted.statusCode, 500)
  t.equal(halted.json().code, 'FST_IDEMPOTENCY_HALTED')
  const refused = await app.inject({ method: 'POST', url: '/orders', headers: key('a b'), payload: {} })
  t.equal(refused.statusCode, 400)
  t.equal(orders, 1, 'the order handler ran once')
  t.equal(crashes, 1, 'the failing handler ran once')
  await app.close()

  // The store fails at tracking (503), then while saving a response (the client still gets it).
  const store = new FaultyStore()
  const outage = await buildApp({ store })
  outage.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  store.failing.add('insert')
  const unavailable = await outage.inject({ method: 'POST', url: '/orders', headers: key('d'), payload: {} })
  t.equal(unavailable.statusCode, 503)
  store.failing = new Set(['update'])
  t.equal((await outage.inject({ method: 'POST', url: '/orders', headers: key('e'), payload: {} })).statusCode, 200)
  t.same(store.calls.map((call) => call.operation), ['insert', 'insert', 'update'])
  await outage.close()

  const collected = await collect()
  const requests = collected.metrics.get('idempotency.requests')
  t.equal(requests?.descriptor.unit, '{request}')
  t.equal(requests?.dataPointType, DataPointType.SUM)
  t.same(byAttributes(requests, requestAttributes), {
    'executed /orders POST': 2,
    'replayed /orders POST': 1,
    'executed /slow POST': 1,
    'conflict /slow POST FST_IDEMPOTENCY_CONFLICT': 1,
    'mismatch /orders POST FST_IDEMPOTENCY_MISMATCH': 1,
    'executed /crash POST': 1,
    'halted /crash POST FST_IDEMPOTENCY_HALTED': 1,
    'refused /orders POST FST_IDEMPOTENCY_KEY_INVALID': 1,
    'unavailable /orders POST FST_IDEMPOTENCY_STORE_UNAVAILABLE': 1
  })
  t.same(byAttributes(collected.metrics.get('idempotency.settlements'), settleAttributes), {
    'completed /orders POST': 1,
    'completed /slow POST': 1,
    'halted /crash POST': 1,
    'not-stored /orders POST Error': 1
  })

  const durations = collected.metrics.get('idempotency.store.operation.duration')
  t.equal(durations?.descriptor.unit, 's')
  t.equal(durations?.dataPointType, DataPointType.HISTOGRAM)
  // Memory: an insert per tracked request (two each for /slow and /crash), an update per settled one.
  t.same(byAttributes(durations, storeAttributes), {
    'insert memory': 7,
    'update memory': 3,
    'insert FaultyStore Error': 1,
    'insert FaultyStore': 1,
    'update FaultyStore Error': 1
  })
  for (const point of durations?.dataPoints ?? []) {
    const { min, max } = point.value as { min: number, max: number }
    t.ok(min >= 0 && max < 10, `${String(point.attributes['idempotency.store.operation'])} took seconds, not milliseconds`)
  }
})

t.test('names a failed store operation by its error code, else its class', async (t) => {
  const { provider, collect } = meterProvider()
  t.teardown(instrumentIdempotency({ meterProvider: provider }))
  const reasons: Array<[string, unknown]> = [
    ['coded', Object.assign(new Error('connection refused'), { code: 'ECONNREFUSED' })],
    ['typed', new TypeError('not a record')],
    ['text', 'down'],
    ['bare', Object.create(null)],
    ['nameless', new (class extends Object {})()]
  ]
  for (const [name, reason] of reasons) {
    const app = await buildApp({ store: brokenStore(name, reason) })
    app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
    t.equal((await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })).statusCode, 503, name)
    await app.close()
  }
  const collected = await collect()
  t.same(byAttributes(collected.metrics.get('idempotency.store.operation.duration'), storeAttributes), {
    'insert coded ECONNREFUSED': 1,
    'insert typed TypeError': 1,
    'insert text _OTHER': 1,
    'insert bare _OTHER': 1,
    'insert nameless _OTHER': 1
  })
})

t.test('stops recording once unsubscribed, and unsubscribing twice is harmless', async (t) => {
  const { provider, collect } = meterProvider()
  const stop = instrumentIdempotency({ meterProvider: provider })
  const app = await buildApp()
  t.teardown(() => app.close())
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  await app.inject({ method: 'POST', url: '/orders', headers: key('a'), payload: {} })
  const before = await collect()
  stop()
  stop()
  t.notOk(diagnostics.hasSubscribers('fastify-idempotency.request'), 'nothing listens to the request channel')
  t.notOk(diagnostics.hasSubscribers('fastify-idempotency.settle'), 'nothing listens to the settle channel')
  t.notOk(diagnostics.hasSubscribers('tracing:fastify-idempotency.store:start'), 'the store is no longer traced')
  await app.inject({ method: 'POST', url: '/orders', headers: key('a'), payload: {} })
  await app.inject({ method: 'POST', url: '/orders', headers: key('b'), payload: {} })
  const after = await collect()
  for (const [name, attributes] of [
    ['idempotency.requests', requestAttributes],
    ['idempotency.settlements', settleAttributes],
    ['idempotency.store.operation.duration', storeAttributes]
  ] as const) {
    t.same(byAttributes(after.metrics.get(name), [...attributes]), byAttributes(before.metrics.get(name), [...attributes]), `${name} is unchanged`)
  }
  t.same(byAttributes(after.metrics.get('idempotency.requests'), requestAttributes), { 'executed /orders POST': 1 })
})

t.test('leaves out a store operation that was already running when it started', async (t) => {
  const first = meterProvider()
  const second = meterProvider()
  const stopFirst = instrumentIdempotency({ meterProvider: first.provider })
  t.teardown(stopFirst)
  const store = new FaultyStore()
  const inserting = deferred()
  const gate = deferred()
  const insert = store.insert.bind(store)
  store.insert = async (key, record) => {
    inserting.resolve()
    await gate.promise
    return await insert(key, record)
  }
  const app = await buildApp({ store })
  t.teardown(() => app.close())
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  const response = app.inject({ method: 'POST', url: '/orders', headers: key('a'), payload: {} })
  await inserting.promise
  t.teardown(instrumentIdempotency({ meterProvider: second.provider }))
  gate.resolve()
  t.equal((await response).statusCode, 200)
  t.same(byAttributes((await first.collect()).metrics.get('idempotency.store.operation.duration'), storeAttributes),
    { 'insert FaultyStore': 1, 'update FaultyStore': 1 })
  const late = await second.collect()
  t.same(byAttributes(late.metrics.get('idempotency.store.operation.duration'), storeAttributes), { 'update FaultyStore': 1 },
    'the insert began before the second instrumentation')
  t.same(byAttributes(late.metrics.get('idempotency.requests'), requestAttributes), { 'executed /orders POST': 1 })
})

t.test('takes its meter from the global provider by default, or from the meter given', async (t) => {
  const global = meterProvider()
  t.ok(metrics.setGlobalMeterProvider(global.provider))
  t.teardown(() => { metrics.disable() })
  const own = meterProvider()
  const ignored = meterProvider()
  const stopGlobal = instrumentIdempotency()
  const stopOwn = instrumentIdempotency({ meter: own.provider.getMeter('my-app'), meterProvider: ignored.provider })
  t.teardown(() => { stopGlobal(); stopOwn() })
  const app = await buildApp()
  t.teardown(() => app.close())
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  await app.inject({ method: 'POST', url: '/orders', headers: key('a'), payload: {} })

  const fromGlobal = await global.collect()
  t.same(fromGlobal.scopes.get('idempotency.requests'), { name: 'fastify-idempotency', version, schemaUrl: undefined })
  t.same(byAttributes(fromGlobal.metrics.get('idempotency.requests'), requestAttributes), { 'executed /orders POST': 1 })
  const fromOwn = await own.collect()
  t.equal(fromOwn.scopes.get('idempotency.requests')?.name, 'my-app')
  t.same(byAttributes(fromOwn.metrics.get('idempotency.requests'), requestAttributes), { 'executed /orders POST': 1 })
  t.equal((await ignored.collect()).metrics.size, 0, 'a meter given wins over the meter provider')
})

import diagnostics from 'node:diagnostics_channel'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { deferred } from './helpers/timing.js'

// The example as a user runs it: plain JS on the built package (`npm test` builds dist/ first),
// over a real socket.
const { build } = await import(new URL('../examples/metrics.js', import.meta.url).href) as {
  build: (options?: { work?: () => Promise<void> }) => Promise<FastifyInstance>
}

t.test('the metrics example counts each outcome and times the store, in Prometheus text', async (t) => {
  let working = deferred()
  let gate: Promise<void> = Promise.resolve()
  const app = await build({
    work: async () => {
      working.resolve()
      await gate
    }
  })
  t.teardown(() => app.close())
  await app.listen({ host: '127.0.0.1', port: 0 })
  const base = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  const order = (key: string, body: object) => fetch(`${base}/orders`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'idempotency-key': key },
    body: JSON.stringify(body)
  })

  const fresh = await order('order-1', { item: 'book' })
  t.equal(fresh.status, 201)
  t.same(await fresh.json(), { id: 'order_1', item: 'book', quantity: 1 })
  const replay = await order('order-1', { item: 'book' })
  t.equal(replay.status, 201)
  t.equal(replay.headers.get('idempotent-replayed'), 'true')
  t.same(await replay.json(), { id: 'order_1', item: 'book', quantity: 1 })

  working = deferred()
  const open = deferred()
  gate = open.promise
  const running = order('order-2', { item: 'pen' })
  await working.promise
  const conflict = await order('order-2', { item: 'pen' })
  t.equal(conflict.status, 409)
  open.resolve()
  t.same(await (await running).json(), { id: 'order_2', item: 'pen', quantity: 1 })

  const mismatch = await order('order-1', { item: 'lamp' })
  t.equal(mismatch.status, 422)

  const metrics = await fetch(`${base}/metrics`)
  t.equal(metrics.status, 200)
  t.match(metrics.headers.get('content-type'), /^text\/plain; version=0\.0\.4/)
  const text = await metrics.text()
  const samples = (name: string): Record<string, number> => Object.fromEntries(text.split('\n')
    .filter((line) => line.startsWith(`${name}{`))
    .map((line) => {
      const [series = '', value = ''] = line.split(' ')
      return [series.slice(name.length), Number(value)]
    }))
  t.same(samples('idempotency_requests_total'), {
    '{outcome="executed",route="/orders",method="POST"}': 2,
    '{outcome="replayed",route="/orders",method="POST"}': 1,
    '{outcome="conflict",route="/orders",method="POST"}': 1,
    '{outcome="mismatch",route="/orders",method="POST"}': 1
  })
  t.same(samples('idempotency_settlements_total'), { '{outcome="completed",route="/orders",method="POST"}': 2 })
  // An insert per tracked request, an update per stored response.
  t.same(samples('idempotency_store_operation_duration_seconds_count'), {
    '{operation="insert",store="memory"}': 5,
    '{operation="update",store="memory"}': 2
  })
  t.equal(samples('idempotency_store_operation_duration_seconds_bucket')['{le="+Inf",operation="insert",store="memory"}'], 5)
})

t.test('the metrics example unsubscribes from the channels when its app closes', async (t) => {
  const app = await build()
  t.ok(diagnostics.hasSubscribers('fastify-idempotency.request'))
  await app.close()
  t.notOk(diagnostics.hasSubscribers('fastify-idempotency.request'))
  t.notOk(diagnostics.hasSubscribers('fastify-idempotency.settle'))
  t.notOk(diagnostics.hasSubscribers('tracing:fastify-idempotency.store:start'))
  t.notOk(diagnostics.hasSubscribers('tracing:fastify-idempotency.store:asyncEnd'))
})

// An orders API whose POST /orders is idempotent, with Prometheus metrics at GET /metrics: run
// `npm run build && node examples/metrics.js`, then try the curl lines it prints.
//
// It subscribes to the plugin's diagnostics channels itself, with prom-client, rather than through
// fastify-idempotency/otel: an app that already serves a prom-client registry needs no
// OpenTelemetry SDK and Prometheus exporter for three metrics, and the channels' names and
// messages are the plugin's public contract, the same ones fastify-idempotency/otel reads.
import diagnostics from 'node:diagnostics_channel'
import { realpathSync } from 'node:fs'
import { pathToFileURL } from 'node:url'
import Fastify from 'fastify'
import { Counter, Histogram, Registry } from 'prom-client'
import idempotency from '../dist/index.js'

// Store calls take microseconds (memory) to seconds (a remote store at its timeout).
const DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * The app, with a registry of its own. `work` stands for the slow part of an order (a payment
 * provider): slow enough by default to see a 409 from a second terminal.
 */
export async function build ({ logger = false, work = () => delay(Number(process.env.DELAY_MS ?? 3000)) } = {}) {
  const app = Fastify({ logger })
  const registry = new Registry()
  // `route` is the route's pattern (`/orders/:id`), never the URL: one series per route and outcome.
  const requests = new Counter({
    name: 'idempotency_requests_total',
    help: 'Tracked requests, by how they were answered',
    labelNames: ['outcome', 'route', 'method'],
    registers: [registry]
  })
  const settlements = new Counter({
    name: 'idempotency_settlements_total',
    help: 'Records of owned requests, by how they were settled',
    labelNames: ['outcome', 'route', 'method'],
    registers: [registry]
  })
  const storeDuration = new Histogram({
    name: 'idempotency_store_operation_duration_seconds',
    help: 'Duration of idempotency store operations',
    labelNames: ['operation', 'store', 'error_type'],
    buckets: DURATION_BUCKETS,
    registers: [registry]
  })

  const onRequest = ({ outcome, route, method }) => { requests.inc({ outcome, route, method }) }
  const onSettle = ({ outcome, route, method }) => { settlements.inc({ outcome, route, method }) }
  // Every store operation ends at asyncEnd, failed or not (the plugin traces it with tracePromise).
  const timer = Symbol('timer')
  const store = {
    start (context) {
      context[timer] = storeDuration.startTimer({ operation: context.operation, store: context.store })
    },
    asyncEnd (context) {
      context[timer]?.('error' in context ? { error_type: context.error?.code ?? context.error?.constructor?.name ?? '_OTHER' } : {})
    }
  }
  diagnostics.subscribe('fastify-idempotency.request', onRequest)
  diagnostics.subscribe('fastify-idempotency.settle', onSettle)
  diagnostics.tracingChannel('fastify-idempotency.store').subscribe(store)
  app.addHook('onClose', async () => {
    diagnostics.unsubscribe('fastify-idempotency.request', onRequest)
    diagnostics.unsubscribe('fastify-idempotency.settle', onSettle)
    diagnostics.tracingChannel('fastify-idempotency.store').unsubscribe(store)
  })

  await app.register(idempotency, { cacheTtl: 60 * 60 * 1000 })

  let orders = 0
  app.post('/orders', {
    config: { idempotency: true },
    schema: {
      body: {
        type: 'object',
        required: ['item'],
        properties: { item: { type: 'string' }, quantity: { type: 'integer', minimum: 1, default: 1 } }
      }
    }
  }, async (request, reply) => {
    await work()
    orders++
    return reply.code(201).send({ id: `order_${orders}`, ...request.body })
  })

  app.get('/metrics', async (request, reply) => {
    return reply.type(registry.contentType).send(await registry.metrics())
  })

  return app
}

// Listens only when run, not when a test imports build().
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(realpathSync(process.argv[1])).href) {
  const port = Number(process.env.PORT ?? 3000)
  const app = await build({ logger: { level: process.env.LOG_LEVEL ?? 'info' } })
  await app.listen({ host: '127.0.0.1', port })

  const base = `http://127.0.0.1:${port}`
  const json = "-H 'content-type: application/json'"
  console.log(`
Try it:

  # 1. a new order (takes ${Number(process.env.DELAY_MS ?? 3000) / 1000} s), then its replay
  curl -si ${base}/orders ${json} -H 'Idempotency-Key: order-1' -d '{"item":"book"}'
  curl -si ${base}/orders ${json} -H 'Idempotency-Key: order-1' -d '{"item":"book"}'

  # 2. a new key, twice at once: the second gets 409 Conflict
  curl -si ${base}/orders ${json} -H 'Idempotency-Key: order-2' -d '{"item":"pen"}' &
  sleep 0.5; curl -si ${base}/orders ${json} -H 'Idempotency-Key: order-2' -d '{"item":"pen"}'

  # 3. the first key with another body: 422 Unprocessable Entity
  curl -si ${base}/orders ${json} -H 'Idempotency-Key: order-1' -d '{"item":"lamp"}'

  # what it counted
  curl -s ${base}/metrics
`)
}

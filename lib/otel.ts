import type { TracingChannelSubscribers } from 'node:diagnostics_channel'
import { createRequire } from 'node:module'
import { performance } from 'node:perf_hooks'
import { metrics, type Attributes, type Meter, type MeterProvider } from '@opentelemetry/api'
import { requestChannel, settleChannel, storeChannel, type RequestMessage, type SettleMessage, type StoreContext } from './diagnostics.js'

// package.json sits one level above both lib/ and dist/.
const { version } = createRequire(import.meta.url)('../package.json') as { version: string }

// Store calls range from microseconds (memory) to the store's own timeout (seconds); the SDK's
// default boundaries are made for milliseconds.
const DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

export interface InstrumentationOptions {
  /** Where the meter comes from; the global provider of `@opentelemetry/api` without one. */
  meterProvider?: MeterProvider
  /** The meter itself; wins over `meterProvider`. */
  meter?: Meter
}

type TimedContext = StoreContext & Record<symbol, number | undefined>

/**
 * Records the plugin's diagnostics channels as OpenTelemetry metrics, until the function it
 * returns is called:
 * - `idempotency.requests` (`{request}`), by `idempotency.outcome`, `http.route`, `http.request.method`
 *   and, for a refusal, `error.type`;
 * - `idempotency.settlements` (`{request}`), by `idempotency.settle.outcome`, `http.route`,
 *   `http.request.method` and, for `not-stored`, `error.type`;
 * - `idempotency.store.operation.duration` (`s`), by `idempotency.store.operation`,
 *   `idempotency.store` and, for a failed operation, `error.type`.
 *
 * @example
 * import { instrumentIdempotency } from 'fastify-idempotency/otel'
 * const stop = instrumentIdempotency({ meterProvider })
 * app.addHook('onClose', async () => { stop() })
 */
export function instrumentIdempotency (options: InstrumentationOptions = {}): () => void {
  const meter = options.meter ?? (options.meterProvider ?? metrics).getMeter('fastify-idempotency', version)
  const requests = meter.createCounter('idempotency.requests', {
    unit: '{request}',
    description: 'Tracked requests, by how they were answered'
  })
  const settlements = meter.createCounter('idempotency.settlements', {
    unit: '{request}',
    description: 'Records of owned requests, by how they were settled'
  })
  const duration = meter.createHistogram('idempotency.store.operation.duration', {
    unit: 's',
    description: 'Duration of idempotency store operations',
    advice: { explicitBucketBoundaries: DURATION_BUCKETS }
  })
  // Each instrumentation keeps its own start time, so that two of them never consume each other's.
  const started = Symbol('fastify-idempotency.otel.start')

  // Cardinality stays bounded: `route` is the route's URL pattern (`/orders/:id`), never the
  // requested URL, and the method is one the app declared for it; the record (one per key) is
  // left out on purpose.
  const onRequest = (message: unknown): void => {
    const { outcome, route, method, error } = message as RequestMessage
    const attributes: Attributes = { 'idempotency.outcome': outcome, 'http.route': route, 'http.request.method': method }
    if (error !== undefined) attributes['error.type'] = errorType(error)
    requests.add(1, attributes)
  }
  const onSettle = (message: unknown): void => {
    const { outcome, route, method, error } = message as SettleMessage
    const attributes: Attributes = { 'idempotency.settle.outcome': outcome, 'http.route': route, 'http.request.method': method }
    if (error !== undefined) attributes['error.type'] = errorType(error)
    settlements.add(1, attributes)
  }

  // The tracker traces every operation with tracePromise, a store that answers directly included:
  // each ends at asyncEnd, failed or not, so that is where it is timed. An operation already
  // running when this instrumentation started has no start time here and is left out.
  // Node skips the events a subscriber leaves out; @types/node asks for all five.
  const store = {
    start (context: StoreContext): void {
      (context as TimedContext)[started] = performance.now()
    },
    asyncEnd (context: StoreContext): void {
      const start = (context as TimedContext)[started]
      if (start === undefined) return
      const attributes: Attributes = { 'idempotency.store.operation': context.operation, 'idempotency.store': context.store }
      if (context.error !== undefined) attributes['error.type'] = errorType(context.error)
      duration.record((performance.now() - start) / 1000, attributes)
    }
  } as TracingChannelSubscribers<StoreContext>

  requestChannel.subscribe(onRequest)
  settleChannel.subscribe(onSettle)
  storeChannel.subscribe(store)
  let subscribed = true
  return () => {
    if (!subscribed) return
    subscribed = false
    requestChannel.unsubscribe(onRequest)
    settleChannel.unsubscribe(onSettle)
    storeChannel.unsubscribe(store)
  }
}

// `error.type` must stay low in cardinality: a code (`ECONNREFUSED`, `FST_IDEMPOTENCY_CONFLICT`)
// or a class name, never a message.
function errorType (error: unknown): string {
  if (typeof error === 'object' && error !== null) {
    const code = (error as { code?: unknown }).code
    if (typeof code === 'string') return code
    const name = (error as { constructor?: { name?: unknown } }).constructor?.name
    if (typeof name === 'string' && name !== '') return name
  }
  return '_OTHER'
}

import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { AlreadyRegisteredError, InvalidOptionError } from './errors.js'
import { validatePluginOptions, type IdempotencyOptions, type IdempotencyRouteOptions, type PluginSettings } from './options.js'
import { kTracked, type TrackedRequest } from './request.js'
import { routeSettings, trackRoute, type RouteContext } from './route.js'
import { MemoryStore } from './stores/memory.js'
import { documentRoutes } from './swagger.js'
import { PostgresStore, type PostgresPool } from './stores/postgres.js'
import { RedisStore, type RedisClient } from './stores/redis.js'
import type { IdempotencyStore } from './stores/store.js'
import { RequestTracker } from './tracker.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** The request tracker of fastify-idempotency, and through it the store. */
    idempotency: RequestTracker
  }
  interface FastifyRequest {
    /** The idempotency key as the client sent it (unquoted), or `undefined`. */
    idempotencyKey: string | undefined
  }
  interface FastifyContextConfig {
    /** `true` tracks the route, `false` opts it out of `global`, an object overrides options. */
    idempotency?: boolean | IdempotencyRouteOptions
  }
}

const REGISTER_OPTIONS = new Set(['prefix', 'logLevel', 'logSerializers'])
type TrackableRequest = FastifyRequest & { [kTracked]: TrackedRequest | null }

async function idempotencyPlugin (fastify: FastifyInstance, options: IdempotencyOptions): Promise<void> {
  if (fastify.hasDecorator('idempotency')) throw new AlreadyRegisteredError()
  const settings = validatePluginOptions(withoutRegisterOptions(options))
  const tracker = new RequestTracker(storeFor(fastify, settings), {
    logger: fastify.log,
    cacheTtl: settings.cacheTtl,
    processingTtl: settings.processingTtl,
    releaseOnError: settings.releaseOnError,
    maxWaiting: settings.maxWaiting
  })
  const context: RouteContext = {
    tracker,
    settings,
    excludedHeaders: new Set(settings.excludeHeaders),
    problemDetails: settings.problemDetails,
    inProcess: tracker.store.inProcess === true,
    headerLabel: settings.header.replace(/(^|-)([a-z])/g, (_, dash: string, letter: string) => dash + letter.toUpperCase())
  }

  fastify.decorate('idempotency', tracker)
  const documentRoute = documentRoutes(fastify, context)
  fastify.decorateRequest('idempotencyKey', undefined)
  fastify.decorateRequest(kTracked, null)

  const pruneTimer = setInterval(() => {
    // Through a promise, so that a store that throws instead of rejecting cannot throw from a timer.
    Promise.resolve().then(() => tracker.prune()).catch((error: unknown) => {
      fastify.log.warn({ err: error }, 'idempotency store prune failed')
    })
  }, settings.prune).unref()
  fastify.addHook('onClose', async () => {
    clearInterval(pruneTimer)
    tracker.close()
    // What the store opened itself (the Redis store's subscriber); clients passed in stay open.
    await tracker.store.close?.()
  })
  // Before the server waits for the requests in flight: the duplicates that wait end at once.
  fastify.addHook('preClose', (done) => {
    tracker.endWaits()
    done()
  })

  // Method and URL of every tracked route, to tell a route that opted in too late from one of ours.
  const tracked = new Set<string>()
  fastify.addHook('onRoute', (route) => {
    const found = routeSettings(settings, route)
    if (found === undefined) return
    for (const method of Array.isArray(route.method) ? route.method : [route.method]) tracked.add(`${method} ${route.url}`)
    trackRoute(route, found.route, found.onlyMethods, context)
    documentRoute(route, found.route)
  })

  // One onSend hook for every route of this context, added when the plugin registers: it runs
  // before the route's own onSend hooks (those @fastify/compress adds included) and before any
  // added after the plugin, so that it sees the payload as the route produced it.
  const missed = new Set<string>()
  fastify.addHook('onSend', function storeIdempotentResponse (request, reply, payload, done) {
    const trackedRequest = (request as TrackableRequest)[kTracked]
    if (trackedRequest !== null) {
      trackedRequest.onSend(request, reply, payload, done)
      return
    }
    if (request.headers[settings.header] !== undefined) noticeUntracked(request, reply, settings, tracked, missed)
    done(null, payload)
  })
}

/**
 * A keyed request on a route that opts in but that the plugin never saw (declared before the
 * plugin registered): Fastify offers no list of routes to check at ready, so it is noticed here,
 * and logged once per route, since its handler ran untracked.
 */
function noticeUntracked (request: FastifyRequest, reply: FastifyReply, settings: PluginSettings, tracked: Set<string>, missed: Set<string>): void {
  const { url, method, config } = request.routeOptions
  const route = `${request.method} ${String(url)}`
  if (url === undefined || tracked.has(route) || missed.has(route) || !settings.methods.includes(request.method)) return
  const optIn = config?.idempotency
  if (optIn === false || (optIn === undefined && !settings.global) || method === undefined) return
  missed.add(route)
  reply.log.error({ route }, 'idempotency: this route opts in but was declared before fastify-idempotency registered, so it runs untracked; declare routes after `await app.register(idempotency)`')
}

function storeFor (fastify: FastifyInstance, settings: PluginSettings): IdempotencyStore {
  if (settings.store === 'redis') return new RedisStore({ client: decoration<RedisClient>(fastify, 'redis', '@fastify/redis') })
  if (settings.store === 'postgres') return new PostgresStore({ pool: decoration<{ pool: PostgresPool }>(fastify, 'pg', '@fastify/postgres').pool })
  return settings.store ?? new MemoryStore({ logger: fastify.log })
}

// `store: 'redis'` and `store: 'postgres'` use the client that @fastify/redis or @fastify/postgres
// decorated the app with. fastify-plugin's `dependencies` cannot depend on an option, so the
// check is made here, with a message that says what to do.
function decoration<Client> (fastify: FastifyInstance, name: string, plugin: string): Client {
  if (!fastify.hasDecorator(name)) {
    throw new InvalidOptionError(`store '${name === 'pg' ? 'postgres' : name}' needs ${plugin}: register it before fastify-idempotency`)
  }
  return (fastify as unknown as Record<string, Client>)[name] as Client
}

function withoutRegisterOptions (options: IdempotencyOptions): unknown {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) return options
  const plugin: Record<string, unknown> = {}
  for (const [name, value] of Object.entries(options)) {
    if (!REGISTER_OPTIONS.has(name)) plugin[name] = value
  }
  return plugin
}

/**
 * The fastify-idempotency plugin: makes opted-in routes idempotent with the `Idempotency-Key` header.
 *
 * @example
 * await app.register(idempotency, { cacheTtl: 3_600_000 })
 * app.post('/orders', { config: { idempotency: true } }, createOrder)
 */
export const idempotency = fp(idempotencyPlugin, {
  fastify: '5.x',
  name: 'fastify-idempotency'
})

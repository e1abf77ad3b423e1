import { isUtf8 } from 'node:buffer'
import { pipeline, Readable, Transform } from 'node:stream'
import fp from 'fastify-plugin'
import type {
  FastifyInstance,
  FastifyReply,
  FastifyRequest,
  HookHandlerDoneFunction,
  RouteOptions
} from 'fastify'
import {
  ConflictError,
  HaltedError,
  InvalidOptionError,
  KeyInvalidError,
  KeyMissingError,
  KeyMultipleError,
  MismatchError,
  StoreUnavailableError,
  isIdempotencyError
} from './errors.js'
import { countHeaderLines, parseKey, requestFingerprint, storageKey, valueFingerprint } from './key.js'
import {
  validatePluginOptions,
  validateRouteOptions,
  type FingerprintFunction,
  type IdempotencyOptions,
  type IdempotencyRouteOptions,
  type ScopeFunction
} from './options.js'
import { MemoryStore } from './stores/memory.js'
import { PostgresStore, type PostgresPool } from './stores/postgres.js'
import { RedisStore, type RedisClient } from './stores/redis.js'
import type { StoredResponse } from './stores/store.js'
import { RequestTracker, type TrackOptions } from './tracker.js'

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

/** The settings of one tracked route: the plugin's options with the route's overrides. */
interface RouteSettings {
  required: boolean
  scope: ScopeFunction | undefined
  fingerprint: FingerprintFunction | undefined
  maxResponseSize: number
  track: TrackOptions
}

/** A request that owns its record: it runs the handler and must settle the record. */
interface OwnedRecord {
  key: string
  owner: string
  route: RouteSettings
  error: Error | undefined
  handler: 'pending' | 'running' | 'settled'
  /** The reply's headers when the handler started: the app's, not the handler's. */
  headersBefore: ReturnType<FastifyReply['getHeaders']> | undefined
}

const kOwnedRecord = Symbol('fastify-idempotency.owned-record')
const kReplayed = Symbol('fastify-idempotency.replayed')
type TrackedRequest = FastifyRequest & { [kOwnedRecord]: OwnedRecord | undefined, [kReplayed]: StoredResponse | undefined }
const REGISTER_OPTIONS = new Set(['prefix', 'logLevel', 'logSerializers'])

async function idempotencyPlugin (fastify: FastifyInstance, options: IdempotencyOptions): Promise<void> {
  const settings = validatePluginOptions(withoutRegisterOptions(options))
  const store = settings.store === 'redis'
    ? new RedisStore({ client: decoration<RedisClient>(fastify, 'redis', '@fastify/redis') })
    : settings.store === 'postgres'
      ? new PostgresStore({ pool: decoration<{ pool: PostgresPool }>(fastify, 'pg', '@fastify/postgres').pool })
      : settings.store ?? new MemoryStore({ logger: fastify.log })
  const tracker = new RequestTracker(store, {
    logger: fastify.log,
    cacheTtl: settings.cacheTtl,
    processingTtl: settings.processingTtl,
    releaseOnError: settings.releaseOnError
  })
  const header = settings.header
  const headerLabel = header.replace(/(^|-)([a-z])/g, (_, dash: string, letter: string) => dash + letter.toUpperCase())
  const trackedMethods = new Set(settings.methods)
  const excludedHeaders = new Set(settings.excludeHeaders)

  fastify.decorate('idempotency', tracker)
  fastify.decorateRequest('idempotencyKey', undefined)
  fastify.decorateRequest(kOwnedRecord, undefined)
  fastify.decorateRequest(kReplayed, undefined)

  const pruneTimer = setInterval(() => {
    tracker.prune().catch((error: unknown) => {
      fastify.log.warn({ err: error }, 'idempotency store prune failed')
    })
  }, settings.prune).unref()

  fastify.addHook('onClose', async () => {
    clearInterval(pruneTimer)
    tracker.close()
  })

  fastify.addHook('onRoute', (route) => {
    const config = route.config?.idempotency
    if (config === false || (config === undefined && !settings.global)) return
    const where = `${String(route.method)} ${route.url}`
    if (config !== undefined && config !== true && (typeof config !== 'object' || config === null || Array.isArray(config))) {
      throw new InvalidOptionError(`route ${where}: config.idempotency must be a boolean or an object`)
    }
    const routeMethods = Array.isArray(route.method) ? route.method : [route.method]
    const methods = routeMethods.filter((method) => trackedMethods.has(method))
    if (methods.length === 0) {
      // Fastify copies a GET route's config to the HEAD route it adds: that HEAD did not opt in.
      if (config === undefined || (routeMethods.length === 1 && routeMethods[0] === 'HEAD')) return
      throw new InvalidOptionError(
        `route ${where} opts in to idempotency, but none of its methods is in methods (${settings.methods.join(', ')})`
      )
    }
    const overrides: IdempotencyRouteOptions = typeof config === 'object' ? validateRouteOptions(config, `route ${where}: `) : {}
    attach(route, {
      required: overrides.required ?? settings.required,
      scope: overrides.scope ?? settings.scope,
      fingerprint: overrides.fingerprint ?? settings.fingerprint,
      maxResponseSize: overrides.maxResponseSize ?? settings.maxResponseSize,
      track: {
        cacheTtl: overrides.cacheTtl ?? settings.cacheTtl,
        processingTtl: overrides.processingTtl ?? settings.processingTtl,
        releaseOnError: overrides.releaseOnError ?? settings.releaseOnError
      }
    }, methods.length === routeMethods.length ? undefined : new Set(methods))
  })

  // Route-level hooks, appended after the route's own: the key is checked before the body is
  // read, and tracking runs after the route's own hooks so that `scope` can read `request.user`.
  // The handler is wrapped to know whether it ran: a response that did not come from it (a later
  // hook answered, or a handler timeout fired while it still runs) must not settle the record
  // as if it had.
  function attach (route: RouteOptions, routeSettings: RouteSettings, onlyMethods: Set<string> | undefined): void {
    const handler = route.handler
    route.handler = function trackedHandler (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply) {
      const owned = (request as TrackedRequest)[kOwnedRecord]
      if (owned === undefined) return handler.call(this, request, reply)
      owned.handler = 'running'
      owned.headersBefore = reply.getHeaders()
      let result: unknown
      try {
        result = handler.call(this, request, reply)
      } catch (error) {
        owned.handler = 'settled'
        throw error
      }
      // A reply is thenable too (it resolves when the response ends): returned from a handler,
      // it means the handler is done.
      if (result !== reply && isPromiseLike(result)) {
        return Promise.resolve(result).finally(() => { handlerSettled(request, reply, owned) })
      }
      handlerSettled(request, reply, owned)
      return result
    }

    route.onRequest = append(route.onRequest, function checkKey (request: FastifyRequest, reply: FastifyReply, next: HookHandlerDoneFunction) {
      if (onlyMethods !== undefined && !onlyMethods.has(request.method)) {
        next()
        return
      }
      const value = request.headers[header]
      if (value === undefined) {
        if (routeSettings.required) fail(request, reply, new KeyMissingError(headerLabel), next)
        else next()
        return
      }
      if (typeof value !== 'string' || (value.includes(',') && countHeaderLines(request.raw.rawHeaders, header) > 1)) {
        fail(request, reply, new KeyMultipleError(headerLabel), next)
        return
      }
      const key = parseKey(value, settings.maxKeyLength)
      if (key === undefined) {
        fail(request, reply, new KeyInvalidError(headerLabel, settings.maxKeyLength), next)
        return
      }
      request.idempotencyKey = key
      next()
    })

    route.preHandler = append(route.preHandler, function trackRequest (request: FastifyRequest, reply: FastifyReply, next: HookHandlerDoneFunction) {
      const clientKey = request.idempotencyKey
      if (clientKey === undefined) {
        next()
        return
      }
      track(request, reply, clientKey, routeSettings).then((runHandler) => {
        if (runHandler) next()
      }, (error: Error) => {
        fail(request, reply, error, next)
      })
    })

    route.onError = append(route.onError, function noteError (request: FastifyRequest, _reply: FastifyReply, error: Error, next: () => void) {
      const owned = (request as TrackedRequest)[kOwnedRecord]
      if (owned !== undefined) owned.error = error
      next()
    })

    // A response that never passed through onSend (a failed onSend chain) is settled here.
    route.onResponse = append(route.onResponse, function settleUnsent (request: FastifyRequest, _reply: FastifyReply, next: () => void) {
      const owned = takeOwned(request)
      if (owned !== undefined) void settle(request, owned, 'halt', 'the response was not seen by onSend and is not stored')
      next()
    })

    route.onSend = append(route.onSend, function saveResponse (request: FastifyRequest, reply: FastifyReply, payload: unknown, next: (error: Error | null, payload?: unknown) => void) {
      const replayed = (request as TrackedRequest)[kReplayed]
      if (replayed !== undefined) {
        next(null, restoreReplay(reply, replayed))
        return
      }
      const owned = takeOwned(request)
      if (owned === undefined) {
        next(null, payload)
        return
      }
      if (owned.handler === 'pending') {
        // A hook after tracking answered: the handler never ran, so the key is free again.
        settle(request, owned, 'release', 'the handler did not run').then(() => { next(null, payload) })
        return
      }
      let body: Buffer | undefined
      let source: Readable | undefined
      try {
        if (isWebResponse(payload)) {
          // Fastify applies a Response's status and headers after onSend, from the Response
          // object; the payload handed on is its body, so they are applied here instead.
          reply.code(payload.status)
          for (const [name, value] of payload.headers) reply.header(name, value)
          payload = payload.body
        }
        if (payload instanceof ReadableStream) payload = Readable.fromWeb(payload as never)
        if (isReadable(payload)) source = payload
        else body = toBuffer(payload)
      } catch (error) {
        settle(request, owned, 'halt', 'the response could not be read').then(() => { next(error as Error) })
        return
      }
      if (reply.statusCode >= 500) {
        // An error answered while the handler still runs (Fastify's handlerTimeout) must not
        // free the key for a second, concurrent run.
        const release = owned.route.track.releaseOnError && (owned.handler === 'settled' || owned.error === undefined)
        settle(request, owned, release ? 'release' : 'halt', 'the handler failed').then(() => { next(null, payload) })
        return
      }
      const expiresAt = Date.now() + owned.route.track.cacheTtl
      reply.header('expires', httpDate(expiresAt))
      if (source !== undefined) {
        next(null, captureStream(request, reply, owned, source, expiresAt))
        return
      }
      if (body === undefined) {
        // Fastify rejects such a payload itself, synchronously: let it.
        void settle(request, owned, 'halt', 'the response body is of a type that cannot be stored')
        next(null, payload)
        return
      }
      // The payload itself goes on: Node sends a string with its headers in one write, which
      // costs less than the two-part write of a Buffer.
      if (body.length > owned.route.maxResponseSize) {
        haltOversized(request, owned, body.length).then(() => { next(null, payload) })
        return
      }
      saveCompleted(request, owned, response(reply, owned, body), expiresAt).then(() => { next(null, payload) })
    })
  }

  // A hijacked reply never reaches onSend: once its response ends, the record is halted (the
  // handler did its work, but what it sent is not known).
  function handlerSettled (request: FastifyRequest, reply: FastifyReply, owned: OwnedRecord): void {
    owned.handler = 'settled'
    // `sent` is true for a hijacked reply; any other reply still owning its record is on its way
    // to onSend.
    if (!reply.sent || (request as TrackedRequest)[kOwnedRecord] !== owned) return
    const res = reply.raw
    const settleHijacked = () => {
      if (takeOwned(request) === owned) void settle(request, owned, 'halt', 'the reply was hijacked and is not stored')
    }
    if (res.writableEnded || res.destroyed) settleHijacked()
    else res.once('close', settleHijacked)
  }

  async function track (request: FastifyRequest, reply: FastifyReply, clientKey: string, route: RouteSettings): Promise<boolean> {
    let scope = ''
    if (route.scope !== undefined) {
      const owner = route.scope(request)
      scope = typeof owner === 'string' ? owner : await owner
      if (typeof scope !== 'string') throw new TypeError('the idempotency scope function must return a string')
    }
    // The route's pattern and its parameters, not the raw URL: `/orders/a/`, `/ORDERS/a` or
    // `/orders/%61` reach the same route with the same parameters, so they are the same request.
    const routeUrl = request.routeOptions.url as string
    const params = request.params as Record<string, string> | undefined
    const target = params === undefined || Object.keys(params).length === 0 ? routeUrl : `${routeUrl}\n${JSON.stringify(params)}`
    const key = storageKey(scope, request.method, target, clientKey)
    let fingerprint: string
    if (route.fingerprint === undefined) {
      fingerprint = requestFingerprint(request.query, request.body)
    } else {
      const material = route.fingerprint(request)
      fingerprint = valueFingerprint(isPromiseLike(material) ? await material : material)
    }
    let result
    try {
      result = await tracker.track(key, fingerprint, route.track)
    } catch (error) {
      request.log.error({ err: error }, 'idempotency store failed while tracking the request')
      throw new StoreUnavailableError()
    }
    switch (result.status) {
      case 'created':
        ;(request as TrackedRequest)[kOwnedRecord] = {
          key,
          owner: result.owner,
          route,
          error: undefined,
          handler: 'pending',
          headersBefore: undefined
        }
        return true
      case 'completed':
        ;(request as TrackedRequest)[kReplayed] = result.response
        reply.code(result.response.statusCode)
        reply.send(replayBody(result.response.body))
        return false
      case 'processing':
        throw new ConflictError()
      case 'mismatch':
        throw new MismatchError()
      case 'halted':
        throw new HaltedError()
    }
  }

  // Runs in the plugin's onSend, after the app's other onSend hooks: whatever they did to the
  // payload, a replay sends the stored bytes and headers, as the first response had them.
  function restoreReplay (reply: FastifyReply, stored: StoredResponse): Buffer | string | undefined {
    if (stored.headers['content-type'] === undefined) reply.removeHeader('content-type')
    reply.code(stored.statusCode)
    reply.headers(stored.headers)
    reply.header('idempotent-replayed', 'true')
    return replayBody(stored.body)
  }

  // The headers the handler set: those the app set before it ran (CORS, request ids) belong to
  // each request and are not replayed.
  function response (reply: FastifyReply, owned: OwnedRecord, body: Buffer): StoredResponse {
    const headers: StoredResponse['headers'] = {}
    const before = owned.headersBefore
    const all = reply.getHeaders()
    for (const name in all) {
      const value = all[name]
      if (value !== undefined && !excludedHeaders.has(name) && (before === undefined || before[name] !== value)) headers[name] = value
    }
    return { statusCode: reply.statusCode, headers, body }
  }

  async function saveCompleted (request: FastifyRequest, owned: OwnedRecord, stored: StoredResponse, expiresAt: number): Promise<void> {
    try {
      if (!await tracker.putResponse(owned.key, owned.owner, stored, expiresAt)) {
        request.log.warn('idempotency record was taken over before the response was saved; it is not stored')
      }
    } catch (error) {
      request.log.error({ err: error }, 'idempotency store failed while saving the response; retries will see the request as halted')
    }
  }

  // `halt`: the outcome is unknown and retries are told so. `release`: the record is deleted and
  // a retry runs the handler, only where that cannot run it twice.
  async function settle (request: FastifyRequest, owned: OwnedRecord, action: 'halt' | 'release', reason: string, details: object = {}): Promise<void> {
    try {
      const settled = action === 'release'
        ? await tracker.release(owned.key, owned.owner)
        : await tracker.halt(owned.key, owned.owner, Date.now() + owned.route.track.cacheTtl)
      if (settled) request.log.warn({ err: owned.error, ...details }, `idempotency record ${action === 'release' ? 'released' : 'halted'}: ${reason}`)
      else request.log.warn('idempotency record was taken over before it was settled')
    } catch (error) {
      tracker.forget(owned.owner)
      request.log.error({ err: error }, `idempotency store failed while settling a request (${reason})`)
    }
  }

  function haltOversized (request: FastifyRequest, owned: OwnedRecord, size: number): Promise<void> {
    return settle(request, owned, 'halt', 'the response is larger than maxResponseSize and is not stored',
      { size, maxResponseSize: owned.route.maxResponseSize })
  }

  // The stream is stored as it is sent: the client's bytes pass through, a copy is kept up to
  // maxResponseSize, and the record is settled before the client sees the end of the body.
  function captureStream (request: FastifyRequest, reply: FastifyReply, owned: OwnedRecord, source: Readable, expiresAt: number): Readable {
    const limit = owned.route.maxResponseSize
    const chunks: Buffer[] = []
    let size = 0
    const capture = new Transform({
      transform (chunk: Buffer, _encoding, callback) {
        size += chunk.length
        if (size <= limit) chunks.push(chunk)
        callback(null, chunk)
      },
      flush (callback) {
        const settled = size > limit
          ? haltOversized(request, owned, size)
          : saveCompleted(request, owned, response(reply, owned, Buffer.concat(chunks, size)), expiresAt)
        settled.then(() => { callback() })
      }
    })
    pipeline(source, capture, (error) => {
      if (error == null) return
      owned.error = error
      // A client that went away cuts the stream short: the handler did its work, so the record
      // is halted, never released for a second run. A stream that failed by itself is a failure.
      const cut = (error as NodeJS.ErrnoException).code === 'ERR_STREAM_PREMATURE_CLOSE'
      void settle(request, owned, cut || !owned.route.track.releaseOnError ? 'halt' : 'release',
        cut ? 'the client went away during a streamed response' : 'the response stream failed')
    })
    return capture
  }

  function fail (request: FastifyRequest, reply: FastifyReply, error: Error, next: HookHandlerDoneFunction): void {
    if (!isIdempotencyError(error)) {
      next(error)
      return
    }
    // Set here rather than left to Fastify's default error handler, so that an app's own
    // error handler answers with Retry-After too.
    if (error.headers !== undefined) reply.headers(error.headers)
    if (!settings.problemDetails) {
      next(error)
      return
    }
    const url = request.url
    const query = url.indexOf('?')
    const { details: _details, ...problem } = error.toProblemDetails(query === -1 ? url : url.slice(0, query))
    reply.code(error.statusCode).type('application/problem+json').send(JSON.stringify(problem))
  }

  function takeOwned (request: FastifyRequest): OwnedRecord | undefined {
    const owned = (request as TrackedRequest)[kOwnedRecord]
    if (owned !== undefined) (request as TrackedRequest)[kOwnedRecord] = undefined
    return owned
  }
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

function append<Hook> (hooks: Hook | Hook[] | undefined, hook: Hook): Hook[] {
  if (hooks === undefined) return [hook]
  return Array.isArray(hooks) ? [...hooks, hook] : [hooks, hook]
}

function isWebResponse (payload: unknown): payload is Response {
  return payload !== null && typeof payload === 'object' && Object.prototype.toString.call(payload) === '[object Response]'
}

function isPromiseLike (value: unknown): value is PromiseLike<unknown> {
  return value !== null && (typeof value === 'object' || typeof value === 'function') &&
    typeof (value as PromiseLike<unknown>).then === 'function'
}

function isReadable (payload: unknown): payload is Readable {
  return payload !== null && typeof payload === 'object' && typeof (payload as Readable).pipe === 'function'
}

// An HTTP date has a resolution of one second: most requests in a second share one string.
let cachedSecond = -1
let cachedDate = ''
function httpDate (ms: number): string {
  const second = Math.floor(ms / 1000)
  if (second !== cachedSecond) {
    cachedSecond = second
    cachedDate = new Date(second * 1000).toUTCString()
  }
  return cachedDate
}

const EMPTY = Buffer.alloc(0)
const TEXT_REPLAY_LIMIT = 16 * 1024

// A small UTF-8 body is replayed as a string, which Node writes with the headers in one go; the
// bytes are the same, since valid UTF-8 decodes and encodes back exactly.
function replayBody (body: Buffer): Buffer | string | undefined {
  if (body.length === 0) return undefined
  return body.length <= TEXT_REPLAY_LIMIT && isUtf8(body) ? body.toString() : body
}

function toBuffer (payload: unknown): Buffer | undefined {
  if (Buffer.isBuffer(payload)) return payload
  if (typeof payload === 'string') return Buffer.from(payload)
  if (payload === undefined || payload === null) return EMPTY
  return undefined
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

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
  type IdempotencyError
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
}

const kOwnedRecord = Symbol('fastify-idempotency.owned-record')
type TrackedRequest = FastifyRequest & { [kOwnedRecord]: OwnedRecord | undefined }
const REGISTER_OPTIONS = new Set(['prefix', 'logLevel', 'logSerializers'])

async function idempotencyPlugin (fastify: FastifyInstance, options: IdempotencyOptions): Promise<void> {
  const settings = validatePluginOptions(withoutRegisterOptions(options))
  const store = settings.store === 'redis'
    ? new RedisStore({ client: redisOf(fastify) })
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
  function attach (route: RouteOptions, routeSettings: RouteSettings, onlyMethods: Set<string> | undefined): void {
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

    // A hijacked reply skips onSend: settle its record once the response is finished.
    route.onResponse = append(route.onResponse, function settleUnsent (request: FastifyRequest, _reply: FastifyReply, next: () => void) {
      const owned = (request as TrackedRequest)[kOwnedRecord]
      if (owned !== undefined) {
        ;(request as TrackedRequest)[kOwnedRecord] = undefined
        void haltUnstored(request, owned, 'the response bypassed onSend (hijacked) and was not stored', {})
      }
      next()
    })

    route.onSend = append(route.onSend, function saveResponse (request: FastifyRequest, reply: FastifyReply, payload: unknown, next: (error: null, payload: unknown) => void) {
      const owned = (request as TrackedRequest)[kOwnedRecord]
      if (owned === undefined) {
        next(null, payload)
        return
      }
      ;(request as TrackedRequest)[kOwnedRecord] = undefined
      if (isWebResponse(payload)) {
        // Fastify applies a Response's status and headers after onSend; apply them now so
        // that they are what gets stored. Fastify applying them again changes nothing.
        reply.code(payload.status)
        for (const [name, value] of payload.headers) reply.header(name, value)
        payload = payload.body
      }
      if (reply.statusCode >= 500) {
        settleFailure(request, owned, 'the handler failed').then(() => { next(null, payload) })
        return
      }
      const expiresAt = Date.now() + owned.route.track.cacheTtl
      reply.header('expires', httpDate(expiresAt))
      if (isReadable(payload) || payload instanceof ReadableStream) {
        const source = payload instanceof ReadableStream ? Readable.fromWeb(payload as never) : payload
        next(null, captureStream(request, reply, owned, source, expiresAt))
        return
      }
      const body = toBuffer(payload)
      if (body === undefined) {
        // Fastify rejects such a payload itself, synchronously: let it.
        void settleFailure(request, owned, 'the response body is of a type that cannot be stored')
        next(null, payload)
        return
      }
      // The payload itself goes on: Node sends a string with its headers in one write, which
      // costs less than the two-part write of a Buffer.
      if (body.length > owned.route.maxResponseSize) {
        haltOversized(request, owned, body.length).then(() => { next(null, payload) })
        return
      }
      saveCompleted(request, owned, response(reply, body), expiresAt).then(() => { next(null, payload) })
    })
  }

  async function track (request: FastifyRequest, reply: FastifyReply, clientKey: string, route: RouteSettings): Promise<boolean> {
    let scope = ''
    if (route.scope !== undefined) {
      const owner = route.scope(request)
      scope = typeof owner === 'string' ? owner : await owner
      if (typeof scope !== 'string') throw new TypeError('the idempotency scope function must return a string')
    }
    const url = request.url
    const query = url.indexOf('?')
    const key = storageKey(scope, request.method, query === -1 ? url : url.slice(0, query), clientKey)
    const fingerprint = route.fingerprint === undefined
      ? requestFingerprint(request.query, request.body)
      : valueFingerprint(route.fingerprint(request))
    let result
    try {
      result = await tracker.track(key, fingerprint, route.track)
    } catch (error) {
      request.log.error({ err: error }, 'idempotency store failed while tracking the request')
      throw new StoreUnavailableError()
    }
    switch (result.status) {
      case 'created':
        ;(request as TrackedRequest)[kOwnedRecord] = { key, owner: result.owner, route, error: undefined }
        return true
      case 'completed':
        replay(reply, result.response)
        return false
      case 'processing':
        throw new ConflictError()
      case 'mismatch':
        throw new MismatchError()
      case 'halted':
        throw new HaltedError()
    }
  }

  function replay (reply: FastifyReply, stored: StoredResponse): void {
    reply.code(stored.statusCode)
    reply.headers(stored.headers)
    reply.header('idempotent-replayed', 'true')
    reply.send(replayBody(stored.body))
  }

  function response (reply: FastifyReply, body: Buffer): StoredResponse {
    const headers: StoredResponse['headers'] = {}
    const all = reply.getHeaders()
    for (const name in all) {
      const value = all[name]
      if (value !== undefined && !excludedHeaders.has(name)) headers[name] = value
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

  async function settleFailure (request: FastifyRequest, owned: OwnedRecord, reason: string): Promise<void> {
    const release = owned.route.track.releaseOnError
    try {
      if (release) await tracker.release(owned.key, owned.owner)
      else await tracker.halt(owned.key, owned.owner, Date.now() + owned.route.track.cacheTtl)
      request.log.warn({ err: owned.error }, `idempotency record ${release ? 'released' : 'halted'}: ${reason}`)
    } catch (error) {
      tracker.forget(owned.owner)
      request.log.error({ err: error }, 'idempotency store failed while settling a failed request')
    }
  }

  // For responses that were sent but cannot be stored: the handler did its work, so even with
  // releaseOnError the record is halted rather than released for a second run.
  async function haltUnstored (request: FastifyRequest, owned: OwnedRecord, reason: string, details: object): Promise<void> {
    try {
      await tracker.halt(owned.key, owned.owner, Date.now() + owned.route.track.cacheTtl)
      request.log.warn(details, `idempotency record halted: ${reason}`)
    } catch (error) {
      tracker.forget(owned.owner)
      request.log.error({ err: error }, 'idempotency store failed while halting a response it could not store')
    }
  }

  function haltOversized (request: FastifyRequest, owned: OwnedRecord, size: number): Promise<void> {
    return haltUnstored(request, owned, 'the response is larger than maxResponseSize and is not stored',
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
          : saveCompleted(request, owned, response(reply, Buffer.concat(chunks, size)), expiresAt)
        settled.then(() => { callback() })
      }
    })
    pipeline(source, capture, (error) => {
      if (error != null) {
        owned.error = error
        void settleFailure(request, owned, 'the response stream failed')
      }
    })
    return capture
  }

  function fail (request: FastifyRequest, reply: FastifyReply, error: Error, next: HookHandlerDoneFunction): void {
    if (!('toProblemDetails' in error)) {
      next(error)
      return
    }
    const problem = error as IdempotencyError
    // Set here rather than left to Fastify's default error handler, so that an app's own
    // error handler answers with Retry-After too.
    if (problem.headers !== undefined) reply.headers(problem.headers)
    if (!settings.problemDetails) {
      next(error)
      return
    }
    const url = request.url
    const query = url.indexOf('?')
    reply
      .code(problem.statusCode)
      .type('application/problem+json')
      .send(JSON.stringify({
        type: problem.type,
        title: problem.title,
        status: problem.statusCode,
        detail: problem.detail,
        instance: query === -1 ? url : url.slice(0, query),
        code: problem.code
      }))
  }
}

// `store: 'redis'` uses the client of @fastify/redis; fastify-plugin's `dependencies` cannot
// depend on an option, so the check is made here, with a message that says what to do.
function redisOf (fastify: FastifyInstance): RedisClient {
  if (!fastify.hasDecorator('redis')) {
    throw new InvalidOptionError("store 'redis' needs @fastify/redis: register it before fastify-idempotency")
  }
  return (fastify as FastifyInstance & { redis: RedisClient }).redis
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

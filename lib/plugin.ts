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
import { andThen, isPromiseLike } from './awaitable.js'
import { countHeaderLines, parseKey, prefixedStorageKey, requestFingerprint, storageKeyPrefix, valueFingerprint } from './key.js'
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
import type { Awaitable, StoredResponse } from './stores/store.js'
import { RequestTracker, type TrackOptions, type TrackResult } from './tracker.js'

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
  /** The route's URL pattern, prefix included. */
  url: string
  required: boolean
  scope: ScopeFunction | undefined
  fingerprint: FingerprintFunction | undefined
  maxResponseSize: number
  track: TrackOptions
  /** The storage key prefix of the last method seen without a scope or parameters, and that method. */
  keyPrefix: string
  keyPrefixMethod: string
}

/** A request that owns its record: it runs the handler and must settle the record. */
interface OwnedRecord {
  key: string
  owner: string
  route: RouteSettings
  error: Error | undefined
  handlerDone: boolean
  /** Set once an error armed the check that the response reached onSend. */
  watched: boolean
  /** The reply's headers when the handler started: the app's, not the handler's. */
  headersBefore: ReturnType<FastifyReply['getHeaders']> | undefined
}

/** What tracking decided: the record this request owns and runs, or nothing when it was answered. */
type TrackOutcome = OwnedRecord | undefined

const kOwnedRecord = Symbol('fastify-idempotency.owned-record')
const kReplayed = Symbol('fastify-idempotency.replayed')
const kAnswered = Symbol('fastify-idempotency.answered')
type TrackedRequest = FastifyRequest & {
  [kOwnedRecord]: OwnedRecord | undefined
  [kReplayed]: StoredResponse | undefined
  /** An error was answered before the handler ran (a handler timeout while the store was asked). */
  [kAnswered]: boolean
}
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
  // Keys and fingerprints are hashed for any store outside this process.
  const inProcess = tracker.store.inProcess === true
  const header = settings.header
  const headerLabel = header.replace(/(^|-)([a-z])/g, (_, dash: string, letter: string) => dash + letter.toUpperCase())
  const trackedMethods = new Set(settings.methods)
  const excludedHeaders = new Set(settings.excludeHeaders)

  fastify.decorate('idempotency', tracker)
  fastify.decorateRequest('idempotencyKey', undefined)
  fastify.decorateRequest(kOwnedRecord, undefined)
  fastify.decorateRequest(kReplayed, undefined)
  fastify.decorateRequest(kAnswered, false)

  const pruneTimer = setInterval(() => {
    Promise.resolve().then(() => tracker.prune()).catch((error: unknown) => {
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
      url: route.url,
      required: overrides.required ?? settings.required,
      scope: overrides.scope ?? settings.scope,
      fingerprint: overrides.fingerprint ?? settings.fingerprint,
      maxResponseSize: overrides.maxResponseSize ?? settings.maxResponseSize,
      track: {
        cacheTtl: overrides.cacheTtl ?? settings.cacheTtl,
        processingTtl: overrides.processingTtl ?? settings.processingTtl,
        releaseOnError: overrides.releaseOnError ?? settings.releaseOnError
      },
      keyPrefix: '',
      keyPrefixMethod: ''
    }, methods.length === routeMethods.length ? undefined : new Set(methods))
  })

  // Route-level hooks, appended after the route's own. The key is checked in onRequest, before
  // the body is read; tracking runs in the handler's place, after the route's own hooks, so that
  // `scope` can read `request.user` and no hook can answer between tracking and the handler.
  // Requests without a key cost one onRequest and one onSend call.
  function attach (route: RouteOptions, routeSettings: RouteSettings, onlyMethods: Set<string> | undefined): void {
    const handler = route.handler
    route.handler = function trackedHandler (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply) {
      const clientKey = request.idempotencyKey
      if (clientKey === undefined) return handler.call(this, request, reply)
      let tracked: Awaitable<TrackOutcome>
      try {
        tracked = track(request, reply, clientKey, routeSettings)
      } catch (error) {
        return fail(request, reply, error as Error)
      }
      if (!isPromiseLike(tracked)) return tracked === undefined ? undefined : runOwned(this, handler, request, reply, tracked)
      // Fastify sends what a handler's promise resolves to, unless the reply was sent: a
      // replayed or refused request resolves to its reply, which resolves once the response ends.
      return tracked.then(
        (owned) => owned === undefined ? reply : runOwned(this, handler, request, reply, owned),
        (error: Error) => fail(request, reply, error) ?? reply
      )
    }

    route.onRequest = append(route.onRequest, function checkKey (request: FastifyRequest, reply: FastifyReply, next: HookHandlerDoneFunction) {
      if (onlyMethods !== undefined && !onlyMethods.has(request.method)) {
        next()
        return
      }
      const value = request.headers[header]
      if (value === undefined) {
        if (routeSettings.required) refuse(request, reply, new KeyMissingError(headerLabel), next)
        else next()
        return
      }
      if (typeof value !== 'string' || (value.includes(',') && countHeaderLines(request.raw.rawHeaders, header) > 1)) {
        refuse(request, reply, new KeyMultipleError(headerLabel), next)
        return
      }
      const key = parseKey(value, settings.maxKeyLength)
      if (key === undefined) {
        refuse(request, reply, new KeyInvalidError(headerLabel, settings.maxKeyLength), next)
        return
      }
      request.idempotencyKey = key
      next()
    })

    // A response that does not pass through onSend after an error (Fastify's fallback when the
    // error response fails too) is settled once it ends.
    route.onError = append(route.onError, function noteError (request: FastifyRequest, reply: FastifyReply, error: Error, next: () => void) {
      const owned = (request as TrackedRequest)[kOwnedRecord]
      if (owned === undefined) {
        ;(request as TrackedRequest)[kAnswered] = true
      } else {
        owned.error = error
        if (!owned.watched) {
          owned.watched = true
          reply.raw.once('close', () => {
            if (takeOwned(request) === owned) void settle(request, owned, 'halt', 'the response was not seen by onSend and is not stored')
          })
        }
      }
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
      let body: Buffer | string | undefined
      let source: Readable | undefined
      try {
        if (typeof payload === 'string') {
          body = payload
        } else {
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
        }
      } catch (error) {
        andThen(settle(request, owned, 'halt', 'the response could not be read'), () => { next(error as Error) })
        return
      }
      if (reply.statusCode >= 500) {
        // An error answered while the handler still runs (Fastify's handlerTimeout) must not
        // free the key for a second, concurrent run.
        const release = owned.route.track.releaseOnError && (owned.handlerDone || owned.error === undefined)
        andThen(settle(request, owned, release ? 'release' : 'halt', 'the handler failed'), () => { next(null, payload) })
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
      // costs less than the two-part write of a Buffer. A string is stored as it is, too.
      const saved = exceeds(body, owned.route.maxResponseSize)
        ? haltOversized(request, owned, Buffer.byteLength(body))
        : saveCompleted(request, owned, response(reply, owned, body), expiresAt)
      if (isPromiseLike(saved)) saved.then(() => { next(null, payload) })
      else next(null, payload)
    })
  }

  // The handler runs only for the request that created the record.
  function runOwned (instance: FastifyInstance, handler: RouteOptions['handler'], request: FastifyRequest, reply: FastifyReply, owned: OwnedRecord): unknown {
    if ((request as TrackedRequest)[kAnswered] || reply.sent || reply.raw.headersSent) {
      // Answered (a handler timeout) while the store was asked: the handler never runs, so the
      // key is free again.
      return andThen(settle(request, owned, 'release', 'the request was answered before its handler ran'), () => reply)
    }
    owned.headersBefore = reply.getHeaders()
    ;(request as TrackedRequest)[kOwnedRecord] = owned
    let result: unknown
    try {
      result = handler.call(instance, request, reply)
    } catch (error) {
      owned.handlerDone = true
      throw error
    }
    // Most handlers send before they return: the record is saved already, and nothing is left
    // to watch. A reply is thenable too (it resolves when the response ends): returned from a
    // handler, it means the handler is done. The handler's own promise goes back to Fastify untouched.
    if ((request as TrackedRequest)[kOwnedRecord] !== owned) {
      owned.handlerDone = true
    } else if (result !== reply && isPromiseLike(result)) {
      const done = (): void => { handlerSettled(request, reply, owned) }
      result.then(done, done)
    } else {
      handlerSettled(request, reply, owned)
    }
    return result
  }

  // A hijacked reply never reaches onSend: once its response ends, the record is halted (the
  // handler did its work, but what it sent is not known).
  function handlerSettled (request: FastifyRequest, reply: FastifyReply, owned: OwnedRecord): void {
    owned.handlerDone = true
    // `sent` is true for a hijacked reply; any other reply still owning its record is on its way
    // to onSend.
    if (!reply.sent || (request as TrackedRequest)[kOwnedRecord] !== owned) return
    const res = reply.raw
    const settleHijacked = (): void => {
      if (takeOwned(request) === owned) void settle(request, owned, 'halt', 'the reply was hijacked and is not stored')
    }
    if (res.writableEnded || res.destroyed) settleHijacked()
    else res.once('close', settleHijacked)
  }

  // Tracking goes on synchronously as long as the scope, the fingerprint and the store answer
  // synchronously; each of them may also answer with a promise.
  function track (request: FastifyRequest, reply: FastifyReply, clientKey: string, route: RouteSettings): Awaitable<TrackOutcome> {
    if (route.scope === undefined) return trackScoped(request, reply, clientKey, route, '')
    const scope = route.scope(request)
    return isPromiseLike(scope)
      ? scope.then((value) => trackScoped(request, reply, clientKey, route, value))
      : trackScoped(request, reply, clientKey, route, scope)
  }

  function trackScoped (request: FastifyRequest, reply: FastifyReply, clientKey: string, route: RouteSettings, scope: unknown): Awaitable<TrackOutcome> {
    if (typeof scope !== 'string') throw new TypeError('the idempotency scope function must return a string')
    // The route's pattern and its parameters, not the raw URL: `/orders/a/`, `/ORDERS/a` or
    // `/orders/%61` reach the same route with the same parameters, so they are the same request.
    const params = request.params as Record<string, string> | undefined
    const method = request.method
    let prefix: string
    if (params !== undefined && !isEmpty(params)) {
      prefix = storageKeyPrefix(scope, method, `${route.url}\n${JSON.stringify(params)}`)
    } else if (scope !== '') {
      prefix = storageKeyPrefix(scope, method, route.url)
    } else {
      if (route.keyPrefixMethod !== method) {
        route.keyPrefix = storageKeyPrefix('', method, route.url)
        route.keyPrefixMethod = method
      }
      prefix = route.keyPrefix
    }
    const key = prefixedStorageKey(prefix, clientKey, inProcess)
    if (route.fingerprint === undefined) {
      return trackFingerprinted(request, reply, key, requestFingerprint(request.query, request.body, inProcess), route)
    }
    const material = route.fingerprint(request)
    return isPromiseLike(material)
      ? material.then((value) => trackFingerprinted(request, reply, key, valueFingerprint(value, inProcess), route))
      : trackFingerprinted(request, reply, key, valueFingerprint(material, inProcess), route)
  }

  function trackFingerprinted (request: FastifyRequest, reply: FastifyReply, key: string, fingerprint: string, route: RouteSettings): Awaitable<TrackOutcome> {
    let result: Awaitable<TrackResult>
    try {
      result = tracker.track(key, fingerprint, route.track)
    } catch (error) {
      throw storeFailed(request, error)
    }
    if (!isPromiseLike(result)) return outcome(request, reply, key, route, result)
    return result.then((value) => outcome(request, reply, key, route, value), (error: unknown) => { throw storeFailed(request, error) })
  }

  function storeFailed (request: FastifyRequest, error: unknown): Error {
    request.log.error({ err: error }, 'idempotency store failed while tracking the request')
    return new StoreUnavailableError()
  }

  function outcome (request: FastifyRequest, reply: FastifyReply, key: string, route: RouteSettings, result: TrackResult): TrackOutcome {
    switch (result.status) {
      case 'created':
        return { key, owner: result.owner, route, error: undefined, handlerDone: false, watched: false, headersBefore: undefined }
      case 'completed':
        ;(request as TrackedRequest)[kReplayed] = result.response
        reply.code(result.response.statusCode)
        reply.send(replayBody(result.response.body))
        return undefined
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
  // each request and are not replayed. Responses of a route mostly carry the same headers (the
  // same Expires within a second): a set equal to the last one stored is stored as that same
  // object, which a store in this process then keeps once. Stored headers are never modified.
  let lastHeaders: StoredResponse['headers'] = Object.freeze({})
  let lastHeaderCount = 0
  function response (reply: FastifyReply, owned: OwnedRecord, body: Buffer | string): StoredResponse {
    const before = owned.headersBefore
    const all = reply.getHeaders()
    let count = 0
    let same = true
    for (const name in all) {
      const value = all[name]
      if (!isStored(name, value, before)) continue
      count++
      if (same && lastHeaders[name] !== value) same = false
    }
    if (!same || count !== lastHeaderCount) {
      const headers: StoredResponse['headers'] = {}
      for (const name in all) {
        const value = all[name]
        if (isStored(name, value, before)) headers[name] = value as StoredResponse['headers'][string]
      }
      // Frozen: records share it, and a store in this process hands it out from lookup().
      lastHeaders = Object.freeze(headers)
      lastHeaderCount = count
    }
    return { statusCode: reply.statusCode, headers: lastHeaders, body }
  }

  function isStored (name: string, value: unknown, before: OwnedRecord['headersBefore']): boolean {
    return value !== undefined && !excludedHeaders.has(name) && (before === undefined || before[name] !== value)
  }

  function saveCompleted (request: FastifyRequest, owned: OwnedRecord, stored: StoredResponse, expiresAt: number): Awaitable<void> {
    let saved: Awaitable<boolean>
    try {
      saved = tracker.putResponse(owned.key, owned.owner, stored, expiresAt)
    } catch (error) {
      saveFailed(request, error)
      return
    }
    if (isPromiseLike(saved)) return saved.then((done) => { savedResponse(request, done) }, (error: unknown) => { saveFailed(request, error) })
    savedResponse(request, saved)
  }

  function savedResponse (request: FastifyRequest, done: boolean): void {
    if (!done) request.log.warn('idempotency record was taken over before the response was saved; it is not stored')
  }

  function saveFailed (request: FastifyRequest, error: unknown): void {
    request.log.error({ err: error }, 'idempotency store failed while saving the response; retries will see the request as halted')
  }

  // `halt`: the outcome is unknown and retries are told so. `release`: the record is deleted and
  // a retry runs the handler, only where that cannot run it twice.
  function settle (request: FastifyRequest, owned: OwnedRecord, action: 'halt' | 'release', reason: string, details: object = {}): Awaitable<void> {
    const settled = (done: boolean): void => {
      if (done) request.log.warn({ err: owned.error, ...details }, `idempotency record ${action === 'release' ? 'released' : 'halted'}: ${reason}`)
      else request.log.warn('idempotency record was taken over before it was settled')
    }
    const failed = (error: unknown): void => {
      tracker.forget(owned.key, owned.owner)
      request.log.error({ err: error }, `idempotency store failed while settling a request (${reason})`)
    }
    let done: Awaitable<boolean>
    try {
      done = action === 'release'
        ? tracker.release(owned.key, owned.owner)
        : tracker.halt(owned.key, owned.owner, Date.now() + owned.route.track.cacheTtl)
    } catch (error) {
      failed(error)
      return
    }
    if (isPromiseLike(done)) return done.then(settled, failed)
    settled(done)
  }

  function haltOversized (request: FastifyRequest, owned: OwnedRecord, size: number): Awaitable<void> {
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
        andThen(size > limit
          ? haltOversized(request, owned, size)
          : saveCompleted(request, owned, response(reply, owned, Buffer.concat(chunks, size)), expiresAt), () => { callback() })
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

  // A refusal from onRequest goes to Fastify through `next`.
  function refuse (request: FastifyRequest, reply: FastifyReply, error: Error, next: HookHandlerDoneFunction): void {
    if (!answeredAsProblem(request, reply, error)) next(error)
  }

  // A refusal from the handler's place is thrown, unless it was answered as problem+json.
  function fail (request: FastifyRequest, reply: FastifyReply, error: Error): undefined {
    if (!answeredAsProblem(request, reply, error)) throw error
    return undefined
  }

  function answeredAsProblem (request: FastifyRequest, reply: FastifyReply, error: Error): boolean {
    if (!isIdempotencyError(error)) return false
    // Set here rather than left to Fastify's default error handler, so that an app's own
    // error handler answers with Retry-After too.
    if (error.headers !== undefined) reply.headers(error.headers)
    if (!settings.problemDetails) return false
    const url = request.url
    const query = url.indexOf('?')
    const { details: _details, ...problem } = error.toProblemDetails(query === -1 ? url : url.slice(0, query))
    reply.code(error.statusCode).type('application/problem+json').send(JSON.stringify(problem))
    return true
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
function replayBody (body: Buffer | string): Buffer | string | undefined {
  if (body.length === 0) return undefined
  if (typeof body === 'string') return body
  return body.length <= TEXT_REPLAY_LIMIT && isUtf8(body) ? body.toString() : body
}

// A string's UTF-8 length is at most three bytes per UTF-16 unit: most strings need no counting.
function exceeds (body: Buffer | string, limit: number): boolean {
  if (typeof body === 'string') return body.length * 3 > limit && Buffer.byteLength(body) > limit
  return body.length > limit
}

function isEmpty (object: object): boolean {
  for (const _ in object) return false
  return true
}

function toBuffer (payload: unknown): Buffer | undefined {
  if (Buffer.isBuffer(payload)) return payload
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

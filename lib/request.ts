import type { Readable } from 'node:stream'
import { step, type Awaitable } from './awaitable.js'
import type { FastifyInstance, FastifyReply, FastifyRequest, RouteHandlerMethod } from 'fastify'
import {
  BodyUnseenError,
  ConflictError,
  HaltedError,
  MismatchError,
  StoreUnavailableError,
  isIdempotencyError
} from './errors.js'
import { requestChannel, settleChannel, type RequestOutcome, type SettleOutcome } from './diagnostics.js'
import { digest, requestFingerprint } from './fingerprint.js'
import type { RequestIdentity } from './key.js'
import { captureStream, exceeds, httpDate, readPayload, replay, storedHeaders, type Payload } from './response.js'
import type { FingerprintFunction } from './options.js'
import type { RouteSettings } from './route.js'
import type { StoredResponse } from './stores/store.js'
import type { RequestTracker, TrackResult } from './tracker.js'

/** What every tracked request of one plugin instance shares. */
export interface PluginContext {
  tracker: RequestTracker
  excludedHeaders: ReadonlySet<string>
  /** Answer the plugin's errors as application/problem+json. */
  problemDetails: boolean
  /** The store keeps its records in this process: it gets keys and small fingerprints as text. */
  inProcess: boolean
}

// An in-process store keeps a fingerprint of up to this many characters as its text.
const FINGERPRINT_TEXT = 256

const OUTCOME_MESSAGES: Record<RequestOutcome, string> = {
  executed: 'idempotency: the request runs',
  takeover: 'idempotency: the request runs, taking over a record whose owner\'s lease lapsed',
  replayed: 'idempotency: replayed the stored response',
  conflict: 'idempotency: refused, the first request with this key is still running',
  mismatch: 'idempotency: refused, the key was used with another payload',
  halted: 'idempotency: refused, the first request with this key halted and its outcome is unknown',
  unavailable: 'idempotency: refused, the store is unavailable',
  refused: 'idempotency: refused, the request body cannot be fingerprinted'
}

/**
 * Where a tracked request stands:
 * - `checked`: its key header is valid; nothing asked of the store yet;
 * - `tracking`: the store is being asked;
 * - `waiting`: a duplicate waits for the first request's outcome (`wait`);
 * - `owned`: it created the record and its handler runs;
 * - `settling`: its response reached onSend (or its end was seen), and the record is being settled;
 * - `settled`: the record is completed, halted or released, or the store failed to settle it;
 * - `replaying`: it gets the stored response;
 * - `refused`: it got one of the plugin's errors (409, 422, 500 halted, 415, 503).
 */
export type TrackedState = 'checked' | 'tracking' | 'waiting' | 'owned' | 'settling' | 'settled' | 'replaying' | 'refused'

type Headers = ReturnType<FastifyReply['getHeaders']>
type SendDone = (error: Error | null, payload?: unknown) => void
type Settlement = { action: 'complete', response: StoredResponse, expiresAt: number } | { action: 'halt' | 'release' }

export const kTracked = Symbol('fastify-idempotency.tracked')

/** One request that carries a valid key on a tracked route: its life, from the key check to its settled record. */
export class TrackedRequest {
  state: TrackedState = 'checked'
  readonly context: PluginContext
  readonly route: RouteSettings
  readonly clientKey: string
  /** The storage key, once tracking began. */
  key = ''
  owner = ''
  /** An error the request met after tracking began: Fastify's handler timeout, or the handler's. */
  error: Error | undefined
  handlerDone = false
  /** An error was answered while the store was asked: the handler must not run. */
  answeredEarly = false
  #headersBefore = {} as Headers
  #sentHeaders: Headers | undefined
  #replayed: StoredResponse | undefined
  #record: string | undefined
  #fingerprint = ''
  #identity: RequestIdentity | undefined
  /** ms the request waited for the first one, once it did. */
  #waited: number | undefined
  #closed = false
  #capture: Readable | undefined
  #captureDropped = false

  constructor (context: PluginContext, route: RouteSettings, clientKey: string) {
    this.context = context
    this.route = route
    this.clientKey = clientKey
  }

  /**
   * The handler's place: tracks the request, then runs the handler, replays, or refuses. It
   * answers at once when the scope, the fingerprint and the store do, else with a promise.
   */
  run (instance: FastifyInstance, handler: RouteHandlerMethod, request: FastifyRequest, reply: FastifyReply): unknown {
    this.state = 'tracking'
    return step(() => this.#track(request), (result) => this.#tracked(instance, handler, request, reply, result),
      (error) => this.#refuse(request, reply, error as Error, error instanceof StoreUnavailableError ? 'unavailable' : error instanceof BodyUnseenError ? 'refused' : undefined))
  }

  #tracked (instance: FastifyInstance, handler: RouteHandlerMethod, request: FastifyRequest, reply: FastifyReply, result: TrackResult): unknown {
    switch (result.status) {
      case 'created':
        this.owner = result.owner
        this.state = 'owned'
        this.#outcome(request, result.tookOver ? 'takeover' : 'executed')
        if (this.answeredEarly || reply.sent || reply.raw.headersSent) {
          return step(() => this.settle(request, { action: 'release' }, 'the request was answered before its handler ran'), () => reply)
        }
        return this.#runHandler(instance, handler, request, reply)
      case 'completed':
        this.state = 'replaying'
        this.#replayed = result.response
        this.#outcome(request, 'replayed')
        replay(reply, result.response)
        return reply
      case 'processing':
        if (this.route.wait === 0 || this.#waited !== undefined) return this.#refuse(request, reply, new ConflictError(), 'conflict')
        return this.#wait(instance, handler, request, reply, result)
      case 'mismatch':
        return this.#refuse(request, reply, new MismatchError(), 'mismatch')
      case 'halted':
        return this.#refuse(request, reply, new HaltedError(), 'halted')
    }
  }

  /**
   * The route's onError: a handler timeout while the store is asked, the owner's error, or an
   * onSend hook after the plugin's failing while a streamed response was being captured.
   */
  noteError (reply: FastifyReply, error: Error): void {
    if (this.state === 'tracking' || this.state === 'waiting') this.answeredEarly = true
    // A stream cut short by a client that left fails the capture by itself.
    if (this.state === 'settling' && this.#capture !== undefined && (error as NodeJS.ErrnoException).code !== 'ERR_STREAM_PREMATURE_CLOSE') {
      // The error response replaces the stream, which is then never read.
      this.#captureDropped = true
      this.#capture.destroy()
      return
    }
    if (this.state !== 'owned') return
    this.error = error
    // Fastify's fallback, when the error response fails too, sends without onSend.
    this.#haltUnsent(reply)
  }

  /** The plugin's onSend: stores an owned request's response, and fixes a replay's content type. */
  onSend (request: FastifyRequest, reply: FastifyReply, payload: unknown, done: SendDone): void {
    if (this.state === 'replaying') {
      if ((this.#replayed as StoredResponse).headers['content-type'] === undefined) reply.removeHeader('content-type')
      done(null, payload)
      return
    }
    if (this.state !== 'owned') {
      done(null, payload)
      return
    }
    this.state = 'settling'
    let read: Payload
    try {
      read = readPayload(reply, payload)
    } catch (error) {
      step(() => this.settle(request, { action: 'halt' }, 'the response could not be read'), () => { done(error as Error) })
      return
    }
    // After readPayload, which applies a web Response's status.
    if (reply.statusCode >= 500) {
      // An error answered while the handler still runs (Fastify's handlerTimeout) must not free the
      // key for a second, concurrent run.
      const release = this.route.track.releaseOnError && (this.handlerDone || this.error === undefined)
      // A web Response's body is opened by now: its stream goes on in its place.
      const body = read.kind === 'stream' ? read.stream : payload
      step(() => this.settle(request, { action: release ? 'release' : 'halt' }, 'the handler failed'), () => { done(null, body) })
      return
    }
    const expiresAt = Date.now() + this.route.track.cacheTtl
    // Noted at reply.send(); a response sent around it (a plugin calling Fastify's own send) has
    // not had its headers changed by any hook yet.
    const sent = this.#sentHeaders ?? reply.getHeaders()
    const headers = storedHeaders(reply, this.#headersBefore, read.headers === undefined ? sent : { ...sent, ...read.headers }, this.context.excludedHeaders)
    headers.expires = httpDate(expiresAt)
    reply.header('expires', headers.expires)
    if (read.kind === 'stream') {
      done(null, this.#captureStream(request, reply, read.stream, headers, expiresAt))
    } else if (read.kind === 'unknown') {
      // Fastify rejects such a payload itself: let it.
      void this.settle(request, { action: 'halt' }, 'the response body is of a type that cannot be stored')
      done(null, payload)
    } else {
      step(() => this.#complete(request, reply, read.body, headers, expiresAt), () => { done(null, payload) })
    }
  }

  /**
   * Settles an owned record: completed with its response, halted (the outcome is unknown, and
   * retries are told so), or released (deleted, so that a retry runs the handler, only where that
   * cannot run it twice). Once: every caller finds the request owned, and settling ends that.
   * Never fails: a store failure is logged.
   */
  settle (request: FastifyRequest, settlement: Settlement, reason: string, details: object = {}): Awaitable<void> {
    this.state = 'settling'
    const tracker = this.context.tracker
    return step(() => settlement.action === 'complete'
      ? tracker.putResponse(this.key, this.owner, settlement.response, settlement.expiresAt)
      : settlement.action === 'halt'
        ? tracker.halt(this.key, this.owner, Date.now() + this.route.track.cacheTtl)
        : tracker.release(this.key, this.owner), (done) => {
      this.state = 'settled'
      const outcome = !done ? 'lost' : settlement.action === 'complete' ? 'completed' : settlement.action === 'halt' ? 'halted' : 'released'
      this.#settled(request, outcome, reason, undefined)
      if (!done) request.log.warn(this.#logFields('lost'), 'idempotency record was taken over before it was settled; it is left as it is')
      else if (settlement.action !== 'complete') request.log.warn({ ...this.#logFields(outcome), err: this.error, ...details }, `idempotency record ${outcome}: ${reason}`)
    }, (error) => {
      this.state = 'settled'
      tracker.abandon(this.key, this.owner)
      this.#settled(request, 'not-stored', reason, error)
      request.log.error({ ...this.#logFields('not-stored'), err: error, operation: settlement.action === 'release' ? 'delete' : 'update' }, settlement.action === 'complete'
        ? 'idempotency store failed while saving the response; retries will see the request as halted'
        : `idempotency store failed while settling a request (${reason})`)
    })
  }

  // The storage key and the fingerprint, from the route's scope and fingerprint functions when
  // it has them (either may be async), then the store's answer. A store failure is a 503.
  #track (request: FastifyRequest): Awaitable<TrackResult> {
    const route = this.route
    return step(() => route.scope?.(request), (scope) => {
      if (route.scope !== undefined && typeof scope !== 'string') throw new TypeError('the idempotency scope function must return a string')
      const identity: RequestIdentity = {
        method: request.method,
        route: route.url,
        constraints: route.constraints,
        params: request.params as Record<string, unknown> | undefined,
        scope: scope as string | undefined,
        key: this.clientKey
      }
      this.key = this.context.tracker.keyOf(identity)
      const textUpTo = this.context.inProcess ? FINGERPRINT_TEXT : 0
      if (route.fingerprint === undefined) return this.#ask(request, defaultFingerprint(request, textUpTo), identity)
      return step(() => (route.fingerprint as FingerprintFunction)(request), (value) => this.#ask(request, digest(value, textUpTo), identity))
    })
  }

  #ask (request: FastifyRequest, fingerprint: string, identity: RequestIdentity): Awaitable<TrackResult> {
    this.#fingerprint = fingerprint
    this.#identity = identity
    return step(() => this.context.tracker.track(this.key, fingerprint, this.route.track, identity), (result) => result, (error) => {
      request.log.error({ ...this.#logFields('unavailable'), err: error, operation: 'insert' }, 'idempotency store failed while tracking the request')
      throw new StoreUnavailableError()
    })
  }

  // A duplicate waits for the first request's outcome, then is answered as if it had just
  // tracked: a replay, halted, or (the first released) it runs. Its client going away ends the wait.
  #wait (instance: FastifyInstance, handler: RouteHandlerMethod, request: FastifyRequest, reply: FastifyReply, running: TrackResult): Promise<unknown> {
    this.state = 'waiting'
    const started = Date.now()
    const controller = new AbortController()
    const abort = (): void => { controller.abort() }
    // A client gone while the store was asked fires no close event for this listener.
    if (reply.raw.destroyed) abort()
    reply.raw.once('close', abort)
    const waited = this.context.tracker.wait(this.key, this.#fingerprint, {
      options: this.route.track, identity: this.#identity, running, ms: this.route.wait, signal: controller.signal
    })
    return waited.finally(() => {
      reply.raw.removeListener('close', abort)
      this.#waited = Date.now() - started
    }).then((result) => this.#tracked(instance, handler, request, reply, result), (error: unknown) => {
      request.log.error({ ...this.#logFields('unavailable'), err: error, operation: 'wait' }, 'idempotency store failed while a duplicate waited')
      return this.#refuse(request, reply, new StoreUnavailableError(), 'unavailable')
    })
  }

  /** The record's name in logs and diagnostics: the storage key's digest, never the client's key. */
  get record (): string {
    this.#record ??= this.context.tracker.recordOf(this.key)
    return this.#record
  }

  #logFields (outcome: RequestOutcome | SettleOutcome): object {
    return { idempotency: { outcome, route: this.route.url, record: this.record } }
  }

  #outcome (request: FastifyRequest, outcome: RequestOutcome, error?: Error): void {
    if (requestChannel.hasSubscribers) {
      requestChannel.publish({ request, outcome, route: this.route.url, method: request.method, record: this.record, error, waited: this.#waited })
    }
    // A replay is the retry support looks for when a client says it saw an operation twice;
    // a conflict is a client retrying early. Both are routine: info. The rest say a client or a
    // request went wrong: warn.
    const level = outcome === 'replayed' || outcome === 'conflict' ? 'info' : outcome === 'executed' || outcome === 'takeover' ? 'debug' : 'warn'
    if (logs(request.log, level)) request.log[level](this.#logFields(outcome), OUTCOME_MESSAGES[outcome])
  }

  #settled (request: FastifyRequest, outcome: SettleOutcome, reason: string, error: unknown): void {
    if (!settleChannel.hasSubscribers) return
    settleChannel.publish({ request, outcome, reason, route: this.route.url, method: request.method, record: this.record, error })
  }

  // A handler is done when its promise settles, or when it sends (one that returns nothing or the
  // reply sends later). Until then an error response (Fastify's handlerTimeout) means it still runs.
  #runHandler (instance: FastifyInstance, handler: RouteHandlerMethod, request: FastifyRequest, reply: FastifyReply): unknown {
    this.#headersBefore = reply.getHeaders()
    // An own property of this reply only: Fastify calls reply.send for every payload, the
    // handler's, an async handler's result and an error handler's.
    reply.send = sendNoting as FastifyReply['send']
    this.#closed = reply.raw.destroyed
    reply.raw.once('close', () => {
      this.#closed = true
      this.#haltUnsent(reply)
    })
    let result: unknown
    try {
      result = handler.call(instance, request, reply)
    } catch (error) {
      this.handlerDone = true
      throw error
    }
    if (result === undefined || result === reply) {
      // A connection that closed before the handler ran fires no close event for it to see.
      if (this.#closed) this.#haltUnsent(reply)
      return reply
    }
    if (typeof (result as PromiseLike<unknown> | null)?.then !== 'function') {
      // Fastify sends it at once.
      this.handlerDone = true
      return result
    }
    // A thenable that is not a promise (a query builder) may run its work at every then: it is
    // resolved once, and Fastify gets the promise.
    const promise = result instanceof Promise ? result : Promise.resolve(result)
    const ended = (): void => {
      this.handlerDone = true
      // Fastify sends what the handler resolved with after this: look once it has. While the
      // connection is open, its close is what looks.
      if (this.#closed) setImmediate(() => { this.#haltUnsent(reply) })
    }
    promise.then(ended, ended)
    return promise
  }

  /** Called at every `reply.send()` of an owned request: what the handler set is known then. */
  noteSend (reply: FastifyReply, payload: unknown): void {
    this.#sentHeaders = reply.getHeaders()
    // An error's response comes from Fastify's error handler, not from a handler that finished.
    if (!(payload instanceof Error) && this.error === undefined) this.handlerDone = true
  }

  // A record no onSend took once the connection closed and the handler is done (a hijacked reply,
  // a client gone before an async handler sent, an error response that failed too) is halted: the
  // handler did its work, and what it sent is not known.
  #haltUnsent (reply: FastifyReply): void {
    if (this.state !== 'owned' || !this.#closed || !(this.handlerDone || reply.sent || this.error !== undefined)) return
    void this.settle(reply.request, { action: 'halt' }, reply.sent
      ? 'the reply was hijacked and is not stored'
      : 'the response was not seen by onSend and is not stored')
  }

  #complete (request: FastifyRequest, reply: FastifyReply, body: Buffer | string, headers: StoredResponse['headers'], expiresAt: number): Awaitable<void> {
    if (exceeds(body, this.route.maxResponseSize)) return this.#haltOversized(request, Buffer.byteLength(body))
    return this.settle(request, { action: 'complete', response: { statusCode: reply.statusCode, headers, body }, expiresAt }, 'the handler completed')
  }

  #haltOversized (request: FastifyRequest, size: number): Awaitable<void> {
    return this.settle(request, { action: 'halt' }, 'the response is larger than maxResponseSize and is not stored',
      { size, maxResponseSize: this.route.maxResponseSize })
  }

  // The stream is stored as it is sent: the client's bytes pass through, a copy is kept up to
  // maxResponseSize, and the record is settled before the client sees the end of the body.
  #captureStream (request: FastifyRequest, reply: FastifyReply, source: Readable, headers: StoredResponse['headers'], expiresAt: number): unknown {
    this.#capture = captureStream(source, this.route.maxResponseSize, (body, size) => body === undefined
      ? this.#haltOversized(request, size)
      : this.settle(request, { action: 'complete', response: { statusCode: reply.statusCode, headers, body }, expiresAt }, 'the handler completed'),
    (error) => {
      this.error = error
      // A client that went away cuts the stream short: the handler did its work, so the record is
      // halted, never released for a second run. A stream that failed by itself is a failure.
      const cut = this.#captureDropped || error.code === 'ERR_STREAM_PREMATURE_CLOSE'
      void this.settle(request, { action: cut || !this.route.track.releaseOnError ? 'halt' : 'release' }, this.#captureDropped
        ? 'an onSend hook after the plugin failed, so the streamed response was not sent'
        : cut ? 'the client went away during a streamed response' : 'the response stream failed')
    })
    return this.#capture
  }

  // A refusal is thrown to Fastify's error handler, unless it is answered as problem+json here.
  #refuse (request: FastifyRequest, reply: FastifyReply, error: Error, outcome: RequestOutcome | undefined): FastifyReply {
    this.state = 'refused'
    if (outcome !== undefined) this.#outcome(request, outcome, error)
    if (!answeredAsProblem(this.context, request, reply, error)) throw error
    return reply
  }
}

// The fields of a log line are built before the call: built only for a level that is on. Fastify's
// logger when logging is off has no level at all.
function logs (log: FastifyRequest['log'], level: 'debug' | 'info' | 'warn'): boolean {
  const withLevels = log as FastifyRequest['log'] & { isLevelEnabled?: (level: string) => boolean }
  return typeof withLevels.isLevelEnabled === 'function' ? withLevels.isLevelEnabled(level) : withLevels.level !== undefined
}

function sendNoting (this: FastifyReply, payload?: unknown): FastifyReply {
  const tracked = (this.request as FastifyRequest & { [kTracked]: TrackedRequest | null })[kTracked]
  if (tracked?.state === 'owned' && !this.sent) tracked.noteSend(this, payload)
  return (Object.getPrototypeOf(this) as FastifyReply).send.call(this, payload)
}

// A body that the route reads after tracking (multipart files read in the handler, a body left as
// a stream) cannot be told apart from another: such a request is refused rather than tracked.
function defaultFingerprint (request: FastifyRequest, textUpTo: number): string {
  const body = request.body
  const headers = request.headers
  const hasBody = headers['transfer-encoding'] !== undefined || (headers['content-length'] !== undefined && headers['content-length'] !== '0')
  if ((body === undefined && hasBody) || (body !== null && typeof (body as { pipe?: unknown })?.pipe === 'function')) throw new BodyUnseenError()
  return requestFingerprint(headers['content-type'], request.query, body, textUpTo)
}

/**
 * Sets an error's headers (Retry-After) on the reply, so that an app's own error handler keeps
 * them, and answers it as problem+json when the plugin is told to; answers whether it did.
 */
export function answeredAsProblem (context: PluginContext, request: FastifyRequest, reply: FastifyReply, error: Error): boolean {
  if (!isIdempotencyError(error)) return false
  if (error.headers !== undefined) reply.headers(error.headers)
  if (!context.problemDetails) return false
  const url = request.url
  const query = url.indexOf('?')
  const { details: _details, ...problem } = error.toProblemDetails(query === -1 ? url : url.slice(0, query))
  reply.code(error.statusCode).type('application/problem+json').send(JSON.stringify(problem))
  return true
}

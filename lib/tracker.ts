import { hash, randomUUID } from 'node:crypto'
import { step, type Awaitable } from './awaitable.js'
import { storeChannel, type StoreOperation } from './diagnostics.js'
import { InvalidOptionError, StoreOperationMissingError } from './errors.js'
import { storageKey, type RequestIdentity } from './key.js'
import { Waits } from './waiting.js'
import type { IdempotencyRecord, IdempotencyStore, InsertResult, ListPage, ListQuery, RecordUpdate, StoredResponse } from './stores/store.js'

/** What `track` found, and so what the request should get. */
export type TrackResult =
  /** No live record: this request owns the new one and runs the handler (`tookOver`: over a lapsed lease). */
  | { status: 'created', owner: string, expiresAt: number, tookOver: boolean }
  /** The first request completed: replay its response. */
  | { status: 'completed', response: StoredResponse, expiresAt: number }
  /** The first request is still running. */
  | { status: 'processing', expiresAt: number }
  /** The first request failed or its instance died: its outcome is unknown. */
  | { status: 'halted', expiresAt: number }
  /** The key was used with a different fingerprint. */
  | { status: 'mismatch', expiresAt: number }

export interface TrackOptions {
  /** ms a record lives after it completes. */
  cacheTtl: number
  /** Lease of the in-flight request, in ms; renewed while it runs. */
  processingTtl: number
  /** Take over a record whose owner's lease expired, instead of reporting it halted. */
  releaseOnError: boolean
}

/** Reports failures of background work (lease renewal), and what operators change. */
export interface TrackerLogger {
  warn (object: object, message: string): void
}

/** How `wait` waits: for how long, until what aborts it, and what `track` answered first. */
export interface WaitOptions {
  options?: TrackOptions
  identity?: RequestIdentity | undefined
  /** The `processing` answer of `track`, answered again when the wait ends without an outcome. */
  running: TrackResult
  ms: number
  signal: AbortSignal
}

/** A record as `find` reports it to an operator. */
export interface FoundRecord {
  /** The storage key's SHA-256 digest (base64url), as logs and diagnostics name the record. */
  record: string
  state: IdempotencyRecord['state']
  expiresAt: number
  /** `processing` only: when the lease ends, and whether it lapsed (the owner is presumed dead). */
  leaseExpiresAt: number | undefined
  leaseExpired: boolean
  /** `processing` and `halted`: when the record was created. */
  createdAt: number | undefined
  /** `completed` only: the stored status, headers and body size in bytes. */
  statusCode: number | undefined
  headers: StoredResponse['headers'] | undefined
  bodySize: number | undefined
}

export interface RequestTrackerOptions extends TrackOptions {
  logger: TrackerLogger
  /** Duplicates that may wait at once, in this tracker; beyond it `wait` answers at once. Default 1000. */
  maxWaiting?: number
}

// Owner tokens are a random id drawn once per load of this module and a counter: unique across
// every tracker, thread and instance that shares a store, without drawing random bytes for each
// request.
const OWNER_PREFIX = `${randomUUID()}.`
let owners = 0

interface Lease {
  owner: string
  timer: NodeJS.Timeout
}

/**
 * Tracks requests so that each keyed request is processed at most once: the first `track`
 * of a key creates a record this tracker owns, later ones see its state. While an owned
 * request runs, its lease is renewed a third of the way through, so a record whose lease
 * expired belongs to a dead instance. The tracker knows nothing of HTTP; the plugin maps its
 * results to responses. Every method answers the way its store does: directly for a store that
 * answers at once (the memory store), through a promise otherwise; `await` fits both. A store
 * failure is thrown or rejected.
 *
 * @example
 * const tracker = new RequestTracker(store, { logger, cacheTtl: 86_400_000, processingTtl: 60_000, releaseOnError: false })
 * const result = await tracker.track(key, fingerprint)
 * if (result.status === 'created') {
 *   await tracker.putResponse(key, result.owner, { statusCode: 201, headers: {}, body })
 * }
 */
export class RequestTracker {
  readonly store: IdempotencyStore
  /** The options `track` uses when given none: the plugin's. */
  readonly defaults: Readonly<TrackOptions>
  #logger: TrackerLogger
  #storeName: string
  // In this process, one request at a time owns a key.
  #leases = new Map<string, Lease>()
  #waits: Waits
  #maxWaiting: number
  #lastCrowdWarning = -Infinity

  constructor (store: IdempotencyStore, { logger, maxWaiting = 1000, ...defaults }: RequestTrackerOptions) {
    this.store = store
    this.defaults = Object.freeze(defaults)
    this.#logger = logger
    this.#storeName = store.name ?? store.constructor.name
    this.#maxWaiting = maxWaiting
    this.#waits = new Waits(store.watch?.bind(store), (key, result) => {
      // Created for waiters that all left: given back, so that a retry runs.
      Promise.resolve().then(() => this.release(key, result.owner)).catch((error: unknown) => {
        this.#logger.warn({ err: error }, 'idempotency store failed to release a record no waiter claimed; it lapses with its lease')
      })
    })
  }

  /**
   * Waits, up to `ms`, for the running request `running` was told of to finish, then answers as
   * `track` would: the stored response, halted, or a record this request now owns (the first was
   * released, or its lapsed lease taken over with `releaseOnError`). Answers `running` again when
   * `ms` passes, `signal` aborts, or `maxWaiting` duplicates wait already. Rejects when the store
   * fails, and when the tracker closes.
   */
  async wait (key: string, fingerprint: string, { options = this.defaults, identity, running, ms, signal }: WaitOptions): Promise<TrackResult> {
    if (this.#waits.size >= this.#maxWaiting) {
      const now = Date.now()
      if (now - this.#lastCrowdWarning >= 60_000) {
        this.#lastCrowdWarning = now
        this.#logger.warn({ maxWaiting: this.#maxWaiting }, 'idempotency: maxWaiting duplicates wait already; more are answered 409 at once')
      }
      return running
    }
    const result = await this.#waits.wait(key, () => this.track(key, fingerprint, options, identity), ms, signal)
    return result ?? running
  }

  /**
   * Looks the key up and, when no live record holds it, atomically creates one owned by this
   * request. `identity`, when given, is kept with a running or halted record for operators.
   */
  track (key: string, fingerprint: string, options: TrackOptions = this.defaults, identity?: RequestIdentity): Awaitable<TrackResult> {
    const owner = OWNER_PREFIX + (++owners).toString(36)
    const now = Date.now()
    // A running record lives at least as long as its lease; renewals keep it alive past that.
    const expiresAt = now + Math.max(options.cacheTtl, options.processingTtl)
    const record = { fingerprint, owner, expiresAt, lease: options.processingTtl, takeOverExpiredLease: options.releaseOnError, identity, createdAt: now }
    return step(() => this.#call('insert', () => this.store.insert(key, record)), (result): TrackResult => {
      if (!result.inserted) return found(result, fingerprint)
      this.#watch(key, owner, options.processingTtl)
      return { status: 'created', owner, expiresAt, tookOver: result.tookOver === true }
    })
  }

  /** The live record of the request `identity` names, as an operator sees it; `undefined` when there is none. */
  find (identity: RequestIdentity): Awaitable<FoundRecord | undefined> {
    const key = this.keyOf(identity)
    return step(() => this.#call('lookup', () => this.store.lookup(key), withoutOrigin), (record) => {
      if (record === undefined) return undefined
      const response = record.response
      return {
        record: this.recordOf(key),
        state: record.state,
        expiresAt: record.expiresAt,
        leaseExpiresAt: record.leaseExpiresAt,
        leaseExpired: record.leaseExpired,
        createdAt: record.createdAt,
        statusCode: response?.statusCode,
        headers: response?.headers,
        bodySize: response === undefined ? undefined : Buffer.byteLength(response.body)
      }
    })
  }

  /**
   * Removes the record of the request `identity` names because an operator decided (a halted
   * request whose outcome is known): a retry then runs the handler. A request that still runs (its
   * lease is live) is left alone, since removing it would let a retry run beside it. Answers
   * whether a record was removed.
   */
  forget (identity: RequestIdentity): Awaitable<boolean> {
    const remove = this.store.remove?.bind(this.store)
    if (remove === undefined) throw new StoreOperationMissingError('remove')
    const key = this.keyOf(identity)
    return step(() => this.#call('remove', () => remove(key)), (removed) => {
      // Never the client's key: it may be all another client needs to get this response.
      if (removed) this.#logger.warn({ record: this.recordOf(key), method: identity.method, route: identity.route }, 'idempotency record forgotten by an operator')
      return removed
    })
  }

  /** Records that need an operator's decision: halted ones, and processing ones whose lease lapsed. */
  list (query: ListQuery): Awaitable<ListPage> {
    const list = this.store.list?.bind(this.store)
    if (list === undefined) throw new StoreOperationMissingError('list')
    if (!Number.isInteger(query.limit) || query.limit < 1) throw new InvalidOptionError('list: limit must be a positive integer')
    if (query.state !== undefined && query.state !== 'halted' && query.state !== 'lapsed') throw new InvalidOptionError("list: state must be 'halted', 'lapsed' or undefined")
    return this.#call('list', () => list(query), (page) => ({
      records: page.records.map(({ key, identity: _identity, ...record }) => ({ ...record, key: this.recordOf(key) })),
      cursor: page.cursor
    }))
  }

  /** The storage key of the request `identity` names, as the plugin builds it for that request. */
  keyOf (identity: RequestIdentity): string {
    return storageKey(identity, this.store.inProcess === true)
  }

  /** How logs, diagnostics and `find` name the record under a storage key: its SHA-256 digest. */
  recordOf (key: string): string {
    // A store outside this process is given the digest itself.
    return this.store.inProcess === true ? hash('sha256', key, 'base64url') : key
  }

  /** Stores the response of an owned request; answers whether the store took it. */
  putResponse (key: string, owner: string, response: StoredResponse, expiresAt = Date.now() + this.defaults.cacheTtl): Awaitable<boolean> {
    return this.#settle(key, owner, { state: 'completed', response, expiresAt })
  }

  /** Marks an owned request halted: its outcome is unknown, and retries are told so. */
  halt (key: string, owner: string, expiresAt = Date.now() + this.defaults.cacheTtl): Awaitable<boolean> {
    return this.#settle(key, owner, { state: 'halted', expiresAt })
  }

  /** Deletes an owned request's record, so that a retry runs the handler again. */
  release (key: string, owner: string): Awaitable<boolean> {
    return this.#settle(key, owner, undefined)
  }

  /** Stops renewing an owned request's lease, e.g. when saving its response failed: it lapses. */
  abandon (key: string, owner: string): void {
    const lease = this.#leases.get(key)
    if (lease?.owner !== owner) return
    clearInterval(lease.timer)
    this.#leases.delete(key)
  }

  /** Removes expired records from the store. */
  prune (): Awaitable<number> {
    return this.#call('prune', () => this.store.prune())
  }

  /** Duplicates that wait now. */
  get waiting (): number {
    return this.#waits.size
  }

  /** Ends every wait: each rejects. */
  endWaits (): void {
    this.#waits.close(new Error('the idempotency tracker closed while a duplicate waited'))
  }

  /**
   * Stops renewing leases (records of requests still running will expire with their lease), and
   * ends every wait.
   */
  close (): void {
    this.endWaits()
    for (const lease of this.#leases.values()) clearInterval(lease.timer)
    this.#leases.clear()
  }

  // Renewals stop before the record is settled. The store's own promise is handed back.
  #settle (key: string, owner: string, update: RecordUpdate | undefined): Awaitable<boolean> {
    this.abandon(key, owner)
    return update === undefined
      ? this.#call('delete', () => this.store.delete(key, owner))
      : this.#call('update', () => this.store.update(key, owner, update))
  }

  // Every store operation, traced for whoever subscribes to the store channel. Traced, a store
  // that answers directly answers through a promise; untraced, it costs one check.
  // `shown` is what the channel's context gets as the result: records without the request's
  // identity, which holds the client's key.
  #call<Value> (operation: StoreOperation, run: () => Awaitable<Value>, shown: (value: Value) => unknown = (value) => value): Awaitable<Value> {
    if (!storeChannel.hasSubscribers) return run()
    let value: Value
    return storeChannel.tracePromise(async () => {
      value = await run()
      return shown(value)
    }, { operation, store: this.#storeName }).then(() => value)
  }

  #watch (key: string, owner: string, lease: number): void {
    // A request of this process that owned the key before lost it to this one.
    clearInterval(this.#leases.get(key)?.timer)
    const timer = setInterval(() => { this.#renew(key, owner, lease) }, Math.max(1, Math.floor(lease / 3))).unref()
    this.#leases.set(key, { owner, timer })
  }

  #renew (key: string, owner: string, lease: number): void {
    // Through a promise, so that a store that throws instead of rejecting cannot throw from a timer.
    Promise.resolve().then(async () => await this.#call('update', () => this.store.update(key, owner, { state: 'processing', lease }))).then((renewed) => {
      if (renewed || this.#leases.get(key)?.owner !== owner) return
      this.abandon(key, owner)
      this.#logger.warn({ record: this.recordOf(key) }, 'idempotency lease lost: the record was taken over or expired')
    }, (error: unknown) => {
      this.#logger.warn({ err: error, record: this.recordOf(key) }, 'idempotency lease renewal failed; it is tried again at the next renewal')
    })
  }
}

function withoutOrigin (record: IdempotencyRecord | undefined): unknown {
  if (record === undefined) return undefined
  const { identity: _identity, ...shown } = record
  return shown
}

function found (result: InsertResult & { inserted: false }, fingerprint: string): TrackResult {
  const record = result.record
  if (record.fingerprint !== fingerprint) return { status: 'mismatch', expiresAt: record.expiresAt }
  if (record.state === 'completed') return { status: 'completed', response: record.response as StoredResponse, expiresAt: record.expiresAt }
  if (record.state === 'processing' && !record.leaseExpired) return { status: 'processing', expiresAt: record.expiresAt }
  return { status: 'halted', expiresAt: record.expiresAt }
}

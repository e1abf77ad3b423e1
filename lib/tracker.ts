import { randomUUID } from 'node:crypto'
import { step, type Awaitable } from './awaitable.js'
import type { IdempotencyStore, InsertResult, RecordUpdate, StoredResponse } from './stores/store.js'

/** What `track` found, and so what the request should get. */
export type TrackResult =
  /** No live record: this request owns the new one and runs the handler. */
  | { status: 'created', owner: string, expiresAt: number }
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

/** Reports failures of background work (lease renewal). */
export interface TrackerLogger {
  warn (object: object, message: string): void
}

export interface RequestTrackerOptions extends TrackOptions {
  logger: TrackerLogger
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
  // In this process, one request at a time owns a key.
  #leases = new Map<string, Lease>()

  constructor (store: IdempotencyStore, { logger, ...defaults }: RequestTrackerOptions) {
    this.store = store
    this.defaults = Object.freeze(defaults)
    this.#logger = logger
  }

  /** Looks the key up and, when no live record holds it, atomically creates one owned by this request. */
  track (key: string, fingerprint: string, options: TrackOptions = this.defaults): Awaitable<TrackResult> {
    const owner = OWNER_PREFIX + (++owners).toString(36)
    // A running record lives at least as long as its lease; renewals keep it alive past that.
    const expiresAt = Date.now() + Math.max(options.cacheTtl, options.processingTtl)
    const record = { fingerprint, owner, expiresAt, lease: options.processingTtl, takeOverExpiredLease: options.releaseOnError }
    return step(() => this.store.insert(key, record), (result): TrackResult => {
      if (!result.inserted) return found(result, fingerprint)
      this.#watch(key, owner, options.processingTtl)
      return { status: 'created', owner, expiresAt }
    })
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
  forget (key: string, owner: string): void {
    const lease = this.#leases.get(key)
    if (lease?.owner !== owner) return
    clearInterval(lease.timer)
    this.#leases.delete(key)
  }

  /** Removes expired records from the store. */
  prune (): Awaitable<number> {
    return this.store.prune()
  }

  /** Stops renewing leases; records of requests still running will expire with their lease. */
  close (): void {
    for (const lease of this.#leases.values()) clearInterval(lease.timer)
    this.#leases.clear()
  }

  // Renewals stop before the record is settled. The store's own promise is handed back.
  #settle (key: string, owner: string, update: RecordUpdate | undefined): Awaitable<boolean> {
    this.forget(key, owner)
    return update === undefined ? this.store.delete(key, owner) : this.store.update(key, owner, update)
  }

  #watch (key: string, owner: string, lease: number): void {
    // A request of this process that owned the key before lost it to this one.
    clearInterval(this.#leases.get(key)?.timer)
    const timer = setInterval(() => { this.#renew(key, owner, lease) }, Math.max(1, Math.floor(lease / 3))).unref()
    this.#leases.set(key, { owner, timer })
  }

  #renew (key: string, owner: string, lease: number): void {
    // Through a promise, so that a store that throws instead of rejecting cannot throw from a timer.
    Promise.resolve().then(async () => await this.store.update(key, owner, { state: 'processing', lease })).then((renewed) => {
      if (renewed || this.#leases.get(key)?.owner !== owner) return
      this.forget(key, owner)
      this.#logger.warn({ key }, 'idempotency lease lost: the record was taken over or expired')
    }, (error: unknown) => {
      this.#logger.warn({ err: error, key }, 'idempotency lease renewal failed; it is tried again at the next renewal')
    })
  }
}

function found (result: InsertResult & { inserted: false }, fingerprint: string): TrackResult {
  const record = result.record
  if (record.fingerprint !== fingerprint) return { status: 'mismatch', expiresAt: record.expiresAt }
  if (record.state === 'completed') return { status: 'completed', response: record.response as StoredResponse, expiresAt: record.expiresAt }
  if (record.state === 'processing' && !record.leaseExpired) return { status: 'processing', expiresAt: record.expiresAt }
  return { status: 'halted', expiresAt: record.expiresAt }
}

import { randomUUID } from 'node:crypto'
import { isPromiseLike } from './awaitable.js'
import type { Awaitable, IdempotencyStore, InsertResult, LeaseHolder, RecordUpdate, StoredResponse } from './stores/store.js'

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

/** Reports failures of background work (lease renewal, prune). */
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
  lease: number
  renewAt: number
}

/**
 * Tracks requests so that each keyed request is processed at most once: the first `track`
 * of a key creates a record this tracker owns, later ones see its state. While an owned
 * request runs, its lease is renewed, so a record whose lease expired belongs to a dead
 * instance. A store that keeps leases itself (the memory store) is sent no renewals: its records
 * die with the process that runs their requests, so their leases last while this tracker is
 * open. The tracker knows nothing of HTTP; the plugin maps its results to responses.
 *
 * Every method answers the way its store does: directly for a store that answers at once (the
 * memory store), through a promise otherwise; `await` fits both. A store failure is thrown or
 * rejected.
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
  // For a store that keeps leases itself: this tracker's hold on its records' leases.
  #holder: LeaseHolder | undefined
  // By record key, whose hash the store already had V8 compute: an owner token is a fresh string
  // that would be hashed again. In this process, one request at a time owns a key.
  #leases = new Map<string, Lease>()
  #renewTimer: NodeJS.Timeout | undefined
  #renewEvery = Infinity

  constructor (store: IdempotencyStore, { logger, ...defaults }: RequestTrackerOptions) {
    this.store = store
    this.defaults = Object.freeze(defaults)
    this.#logger = logger
    this.#holder = store.leaseHolder?.()
  }

  /** Looks the key up and, when no live record holds it, atomically creates one owned by this request. */
  track (key: string, fingerprint: string, options: TrackOptions = this.defaults): Awaitable<TrackResult> {
    const owner = OWNER_PREFIX + (++owners).toString(36)
    const now = Date.now()
    // A running record lives at least as long as its lease; renewals keep it alive past that.
    const expiresAt = now + Math.max(options.cacheTtl, options.processingTtl)
    const inserted = this.store.insert(key, {
      fingerprint,
      owner,
      expiresAt,
      lease: options.processingTtl,
      takeOverExpiredLease: options.releaseOnError,
      holder: this.#holder
    })
    if (isPromiseLike(inserted)) {
      return inserted.then((result) => this.#tracked(result, key, fingerprint, owner, expiresAt, options.processingTtl, now))
    }
    return this.#tracked(inserted, key, fingerprint, owner, expiresAt, options.processingTtl, now)
  }

  #tracked (result: InsertResult, key: string, fingerprint: string, owner: string, expiresAt: number, lease: number, now: number): TrackResult {
    if (result.inserted) {
      if (this.#holder === undefined) this.#watch(owner, key, lease, now)
      return { status: 'created', owner, expiresAt }
    }
    const record = result.record
    if (record.fingerprint !== fingerprint) return { status: 'mismatch', expiresAt: record.expiresAt }
    if (record.state === 'completed') {
      return { status: 'completed', response: record.response as StoredResponse, expiresAt: record.expiresAt }
    }
    if (record.state === 'processing' && !record.leaseExpired) return { status: 'processing', expiresAt: record.expiresAt }
    return { status: 'halted', expiresAt: record.expiresAt }
  }

  /** Stores the response of an owned request; answers whether the store took it. */
  putResponse (
    key: string,
    owner: string,
    response: StoredResponse,
    expiresAt = Date.now() + this.defaults.cacheTtl
  ): Awaitable<boolean> {
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

  /** Lets an owned request's lease run out, e.g. when saving its response failed. */
  forget (key: string, owner: string): void {
    this.#unwatch(key, owner)
    this.#holder?.release(key, owner)
  }

  /** Removes expired records from the store. */
  prune (): Awaitable<number> {
    return this.store.prune()
  }

  /** Stops renewing leases; records of requests still running will expire with their lease. */
  close (): void {
    this.#holder?.close()
    clearInterval(this.#renewTimer)
    this.#renewTimer = undefined
    this.#leases.clear()
  }

  // Renewals stop before the record is settled; a held lease is let go if settling it fails,
  // since no one else would.
  #settle (key: string, owner: string, update: RecordUpdate | undefined): Awaitable<boolean> {
    this.#unwatch(key, owner)
    let settled: Awaitable<boolean>
    try {
      settled = update === undefined ? this.store.delete(key, owner) : this.store.update(key, owner, update)
    } catch (error) {
      this.#holder?.release(key, owner)
      throw error
    }
    if (this.#holder === undefined || !isPromiseLike(settled)) return settled
    return settled.then(undefined, (error: unknown) => {
      this.#holder?.release(key, owner)
      throw error
    })
  }

  #watch (owner: string, key: string, lease: number, now: number): void {
    // One timer for all in-flight requests instead of one per request. A lease is renewed
    // after a third of it has passed; the timer ticks every sixth of the shortest lease seen,
    // so a renewal is sent at the latest half-way through the lease.
    this.#leases.set(key, { owner, lease, renewAt: now + lease / 3 })
    const every = Math.max(1, Math.floor(lease / 6))
    if (every < this.#renewEvery || this.#renewTimer === undefined) {
      this.#renewEvery = Math.min(every, this.#renewEvery)
      clearInterval(this.#renewTimer)
      this.#renewTimer = setInterval(() => { this.#renew() }, this.#renewEvery).unref()
    }
  }

  #unwatch (key: string, owner: string): void {
    if (this.#holder === undefined && this.#leases.get(key)?.owner === owner) this.#leases.delete(key)
  }

  #renew (): void {
    if (this.#leases.size === 0) {
      // Nothing in flight: stop ticking until the next tracked request.
      clearInterval(this.#renewTimer)
      this.#renewTimer = undefined
      this.#renewEvery = Infinity
      return
    }
    const now = Date.now()
    for (const [key, entry] of this.#leases) {
      if (entry.renewAt > now) continue
      entry.renewAt = now + entry.lease / 3
      // Through a promise, so that a store that throws instead of rejecting cannot throw from a timer.
      Promise.resolve().then(() => this.store.update(key, entry.owner, { state: 'processing', lease: entry.lease })).then((renewed) => {
        if (!renewed && this.#leases.get(key) === entry) {
          this.#leases.delete(key)
          this.#logger.warn({ key }, 'idempotency lease lost: the record was taken over or expired')
        }
      }, (error: unknown) => {
        entry.renewAt = 0
        this.#logger.warn({ err: error, key }, 'idempotency lease renewal failed; retrying')
      })
    }
  }
}

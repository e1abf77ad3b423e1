/** Where a tracked request stands. */
export type RecordState = 'processing' | 'completed' | 'halted'

/** A response as it was sent: status, the headers worth replaying, and the body bytes. */
export interface StoredResponse {
  statusCode: number
  /** Lower-case header names; what `reply.headers()` accepts. */
  headers: Record<string, string | number | string[]>
  /** The body bytes; a string stands for its UTF-8 bytes, as Node sends it. */
  body: Buffer | string
}

/** A value, or a promise of it: a store that answers at once may return its answer directly. */
export type Awaitable<Value> = Value | PromiseLike<Value>

/** A record as a store hands it back. */
export interface IdempotencyRecord {
  state: RecordState
  /** The fingerprint of the request that created the record. */
  fingerprint: string
  /** When the record disappears, in ms since the epoch. */
  expiresAt: number
  /**
   * `processing` only: the owner's lease lapsed by the store's own clock, so the instance
   * running the request is presumed dead.
   */
  leaseExpired: boolean
  /** `completed` only. */
  response?: StoredResponse
}

/**
 * A tracker's hold on the leases of its running records, in a store that keeps leases itself
 * (see `IdempotencyStore.leaseHolder`). Each lease runs out one lease after the hold on it ends,
 * by the store's clock.
 */
export interface LeaseHolder {
  /** The tracker closed: the hold on all its records ends. */
  close (): void
  /** The owner of the record under `key` will not settle it (it was forgotten, or settling it failed). */
  release (key: string, owner: string): void
}

/** What `insert` writes when no live record holds the key. */
export interface NewRecord {
  fingerprint: string
  /** A token naming the request that owns the record; only it may update or delete it. */
  owner: string
  /** When the record disappears, in ms since the epoch. */
  expiresAt: number
  /** The lease in ms, judged by the store's clock; renewed by updates in state `processing`. */
  lease: number
  /**
   * When the key holds a `processing` record with the same fingerprint whose lease expired,
   * replace it (the new request runs) instead of returning it.
   */
  takeOverExpiredLease: boolean
  /** The tracker's hold on the lease, from this store's `leaseHolder()`; `undefined` for any other store. */
  holder?: LeaseHolder | undefined
}

export type InsertResult =
  | { inserted: true }
  | { inserted: false, record: IdempotencyRecord }

/** An owner's change to its `processing` record. */
export type RecordUpdate =
  | { state: 'completed', response: StoredResponse, expiresAt: number }
  | { state: 'halted', expiresAt: number }
  /** Renews the lease, and keeps the record alive at least until the lease ends. */
  | { state: 'processing', lease: number }

/**
 * A place to keep idempotency records, shared by every instance that must agree on them.
 *
 * Every method rejects (or throws) when the store cannot answer; a store bounds its own calls
 * in time, so that a request never waits on an unreachable store for long. A store that answers
 * in this process, like the memory store, may return its answers directly instead of promises:
 * the tracker and the plugin then handle a request without waiting a single microtask on it.
 */
export interface IdempotencyStore {
  /**
   * `true` for a store that keeps its records inside this process, as the memory store does:
   * it is given keys and small fingerprints as plain text rather than SHA-256 digests, which
   * spares hashing on every request. Any other store gets digests only, so no client text
   * reaches it. Keys are then at most a few hundred characters longer than the client's key.
   */
  readonly inProcess?: boolean
  /**
   * For a store whose running records cannot outlive the trackers that own them, because both
   * live in this process, as the memory store's do: a new hold for one tracker. That tracker then
   * renews no leases. It gives the hold with each new record, and the store keeps the record's
   * lease for as long as the hold lasts, and one lease more. A renewal of a held record ends the
   * hold on it.
   */
  leaseHolder? (): LeaseHolder
  /**
   * Atomically writes `record` in state `processing` unless a live record holds `key`,
   * in which case that record is returned. Two callers racing on one key never both insert.
   * Expired records count as absent.
   */
  insert (key: string, record: NewRecord): Awaitable<InsertResult>
  /** The live record under `key`, if any. */
  lookup (key: string): Awaitable<IdempotencyRecord | undefined>
  /**
   * Applies `update` when `key` holds a `processing` record owned by `owner`; answers
   * `false` (and changes nothing) otherwise, e.g. when the owner's key was taken over.
   */
  update (key: string, owner: string, update: RecordUpdate): Awaitable<boolean>
  /** Deletes the `processing` record under `key` when `owner` owns it; answers whether it did. */
  delete (key: string, owner: string): Awaitable<boolean>
  /** Removes expired records; answers how many it removed. */
  prune (): Awaitable<number>
  /** Releases what the store itself opened; clients passed in by the caller stay open. */
  close? (): Awaitable<void>
}

import type { Awaitable } from '../awaitable.js'
import type { RequestIdentity } from '../key.js'

/** Where a tracked request stands. */
export type RecordState = 'processing' | 'completed' | 'halted'

/** A response as the route produced it: status, the headers the handler set, and the body bytes. */
export interface StoredResponse {
  statusCode: number
  /** Lower-case header names; what `reply.headers()` accepts. */
  headers: Record<string, string | number | string[]>
  /** The body bytes; a string stands for its UTF-8 bytes, as Node sends it. */
  body: Buffer | string
}

export type { Awaitable } from '../awaitable.js'

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
  /** `lookup` of a `processing` record: when its lease ends, in ms since the epoch. */
  leaseExpiresAt?: number
  /** `lookup` of a `processing` or `halted` record: when it was created, in ms since the epoch. */
  createdAt?: number
  /** `lookup` of a `processing` or `halted` record: the request that created it. */
  identity?: RequestIdentity
}

/** A record that needs an operator's decision, as `list` gives it. */
export interface ListedRecord {
  /** The storage key. */
  key: string
  state: 'processing' | 'halted'
  /** `processing` records are listed only once their lease lapsed. */
  leaseExpired: boolean
  expiresAt: number
  createdAt: number | undefined
  identity: RequestIdentity | undefined
}

/** Which records `list` gives: halted ones, processing ones whose lease lapsed, or both (`undefined`). */
export interface ListQuery {
  state?: 'halted' | 'lapsed' | undefined
  /** At most this many. */
  limit: number
  /** Where the previous page ended. */
  cursor?: string | undefined
}

export interface ListPage {
  records: ListedRecord[]
  /** Pass it to get the next page; `undefined` when there is none. */
  cursor: string | undefined
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
  /** The request that creates the record, kept while it is processing or halted, for operators. */
  identity?: RequestIdentity | undefined
  /** When it was created, in ms since the epoch. */
  createdAt?: number | undefined
}

export type InsertResult =
  /** `tookOver`: the record replaced a processing one whose lease had lapsed. */
  | { inserted: true, tookOver?: boolean }
  | { inserted: false, record: IdempotencyRecord }

/** An owner's change to its `processing` record. */
export type RecordUpdate =
  | { state: 'completed', response: StoredResponse, expiresAt: number }
  | { state: 'halted', expiresAt: number }
  /** Renews the lease, and keeps the record alive at least until the lease ends. */
  | { state: 'processing', lease: number }

/**
 * A place to keep idempotency records, shared by every instance that must agree on them. Keys
 * and fingerprints are SHA-256 digests (base64url), so that no client text reaches a store, but
 * for a store that says it is `inProcess`.
 *
 * Every method returns a promise, which rejects when the store cannot answer; a store bounds its
 * own calls in time, so that a request never waits on an unreachable store for long. A store
 * that answers in this process, as the memory store does, may answer directly instead (and
 * throw): a request then goes through without waiting a single microtask on it.
 */
export interface IdempotencyStore {
  /**
   * `true` for a store that keeps its records in this process, as the memory store does: it is
   * given keys, and fingerprints of up to 256 characters, as their canonical text rather than
   * its digest, which spares two hashes a request. Such a text starts with `[`, which no digest
   * does.
   */
  readonly inProcess?: boolean
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
  /**
   * Deletes the record under `key`, for an operator: completed, halted, or running with a lapsed
   * lease, but never one whose owner still runs (a live lease); answers whether it deleted one.
   */
  remove? (key: string): Awaitable<boolean>
  /** Records that need an operator's decision: halted ones, and processing ones whose lease lapsed. */
  list? (query: ListQuery): Awaitable<ListPage>
  /**
   * Notifications, for duplicates that wait: calls `listener` (perhaps more than once, perhaps
   * late, perhaps never: waiters look again on their own too) after the record under `key` is
   * completed, halted or deleted; returns what stops it. A store without it is polled.
   */
  watch? (key: string, listener: () => void): () => void
  /** Named in the store's diagnostics: `memory`, `redis`, `postgres`. */
  readonly name?: string
  /** Releases what the store itself opened; clients passed in by the caller stay open. */
  close? (): Awaitable<void>
}

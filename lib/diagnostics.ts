import diagnostics from 'node:diagnostics_channel'
import type { FastifyRequest } from 'fastify'

/**
 * How a tracked request was answered:
 * - `executed`: it created the record and its handler ran;
 * - `takeover`: as `executed`, over a record whose owner's lease had lapsed (`releaseOnError`);
 * - `replayed`: it got the stored response;
 * - `conflict`: 409, the first request still runs (after `wait`, when set);
 * - `mismatch`: 422, the key was used for another payload;
 * - `halted`: 500, the first request's outcome is unknown;
 * - `unavailable`: 503, the store could not answer;
 * - `refused`: 400 or 415, the key header (or a body the plugin cannot see) was refused.
 */
export type RequestOutcome = 'executed' | 'takeover' | 'replayed' | 'conflict' | 'mismatch' | 'halted' | 'unavailable' | 'refused'

/** How an owned request's record was settled. */
export type SettleOutcome =
  /** Its response is stored. */
  | 'completed'
  /** Its outcome is unknown (a 5xx, a hijacked reply, a failed stream, an oversized body). */
  | 'halted'
  /** Deleted, so that a retry runs again (`releaseOnError`, or answered before the handler ran). */
  | 'released'
  /** The store failed while settling: the record lapses with its lease. */
  | 'not-stored'
  /** Another request took the record over before this one settled it. */
  | 'lost'

/** A message of `fastify-idempotency.request`. */
export interface RequestMessage {
  request: FastifyRequest
  outcome: RequestOutcome
  /** The route's URL pattern, as in `request.routeOptions.url`. */
  route: string
  method: string
  /** The SHA-256 digest (base64url) of the storage key, as `find` reports it; `undefined` when the request was refused before it had one. */
  record: string | undefined
  /** The plugin's error, for a refusal. */
  error?: Error
  /** ms the request waited for the first one with its key (`wait`), when it did. */
  waited?: number | undefined
}

/** A message of `fastify-idempotency.settle`. */
export interface SettleMessage {
  request: FastifyRequest
  outcome: SettleOutcome
  /** Why, in words: "the handler completed", "the handler failed", … */
  reason: string
  route: string
  method: string
  record: string
  /** The store's error, for `not-stored`. */
  error?: unknown
}

/** An operation a store was asked for. */
export type StoreOperation = 'insert' | 'lookup' | 'update' | 'delete' | 'remove' | 'list' | 'prune'

/** The context of `fastify-idempotency.store`: which operation of which store. */
export interface StoreContext {
  operation: StoreOperation
  /** `memory`, `redis`, `postgres`, or a custom store's `name` (its class name without one). */
  store: string
  /** Set by the channel: what the operation answered, or why it failed. */
  result?: unknown
  error?: unknown
}

/** Every outcome of a tracked request, once. */
export const requestChannel = diagnostics.channel('fastify-idempotency.request')
/** How each owned request was settled, once. */
export const settleChannel = diagnostics.channel('fastify-idempotency.settle')
/** Around every store operation: `start`, `end`, then `asyncStart`, `asyncEnd` (and `error`). */
export const storeChannel = diagnostics.tracingChannel<StoreContext, StoreContext>('fastify-idempotency.store')

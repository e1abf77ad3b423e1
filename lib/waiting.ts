import type { Awaitable } from './awaitable.js'
import type { TrackResult } from './tracker.js'

/** Asks the store again for a key: the same `track` the first attempt made. */
export type Check = () => Awaitable<TrackResult>
/** A store's notification of a change to a key (see `IdempotencyStore.watch`); returns what stops it. */
export type Watch = (key: string, listener: () => void) => () => void
/** Gives back a record a check created when no waiter was left to run it. */
export type Unclaimed = (key: string, result: TrackResult & { status: 'created' }) => void

interface Waiter {
  resolve: (result: TrackResult | undefined) => void
  reject: (error: unknown) => void
}

/** The duplicates of one key that wait in this process: one watch and one check for all of them. */
interface Group {
  key: string
  check: Check
  waiters: Set<Waiter>
  unwatch: () => void
  timer: NodeJS.Timeout | undefined
  /** ms until the next fallback check; grows to MAX_INTERVAL. */
  interval: number
  checking: boolean
  /** A change was told while a check ran: check again after it. */
  again: boolean
}

// Fallback checks, for a store that cannot notify or a notification that was lost: from 100 ms,
// doubling to 1 s, each with up to a fifth of jitter so that instances do not check in step.
const FIRST_INTERVAL = 100
const MAX_INTERVAL = 1000
const noWatch = (): void => {}

/**
 * Duplicates of a running request that wait for its outcome. A group of one key's waiters watches
 * the key when the store can notify, checks it again at once (a change may have come before the
 * watch), then on every notification and at a slow, growing fallback interval. A check that finds
 * the record completed or halted answers every waiter; one that created a record (the first was
 * released, or its lapsed lease taken over) answers one waiter, which now owns it.
 */
export class Waits {
  readonly #watch: Watch | undefined
  readonly #unclaimed: Unclaimed
  #groups = new Map<string, Group>()
  /** Waiters of every key. */
  size = 0

  constructor (watch: Watch | undefined, unclaimed: Unclaimed) {
    this.#watch = watch
    this.#unclaimed = unclaimed
  }

  /**
   * Waits until `check` finds the key no longer running, or for `ms` (answers `undefined`), or
   * until `signal` aborts (answers `undefined`). Rejects when a check fails, or on `close`.
   */
  wait (key: string, check: Check, ms: number, signal: AbortSignal): Promise<TrackResult | undefined> {
    return new Promise((resolve, reject) => {
      const group = this.#groups.get(key) ?? this.#open(key, check)
      // Once: a waiter is answered once, by its deadline, its signal, a check or close.
      const leave = (): void => {
        group.waiters.delete(waiter)
        this.size--
        clearTimeout(deadline)
        signal.removeEventListener('abort', timeUp)
        if (group.waiters.size === 0) this.#end(group)
      }
      const waiter: Waiter = {
        resolve: (result) => { leave(); resolve(result) },
        reject: (error) => { leave(); reject(error) }
      }
      const timeUp = (): void => { waiter.resolve(undefined) }
      const deadline = setTimeout(timeUp, ms)
      signal.addEventListener('abort', timeUp)
      group.waiters.add(waiter)
      this.size++
      if (signal.aborted) timeUp()
    })
  }

  /** Ends every wait with `error`. */
  close (error: Error): void {
    for (const group of [...this.#groups.values()]) {
      for (const waiter of [...group.waiters]) waiter.reject(error)
    }
  }

  #open (key: string, check: Check): Group {
    const group: Group = { key, check, waiters: new Set(), unwatch: noWatch, timer: undefined, interval: FIRST_INTERVAL, checking: false, again: false }
    this.#groups.set(key, group)
    // Told synchronously by a store in this process, from inside its own update: checked after it.
    group.unwatch = this.#watch?.(key, () => { queueMicrotask(() => { this.#check(group) }) }) ?? noWatch
    queueMicrotask(() => { this.#check(group) })
    return group
  }

  // Once, when its last waiter leaves.
  #end (group: Group): void {
    this.#groups.delete(group.key)
    clearTimeout(group.timer)
    group.unwatch()
  }

  #check (group: Group): void {
    if (this.#groups.get(group.key) !== group) return
    if (group.checking) {
      group.again = true
      return
    }
    group.checking = true
    clearTimeout(group.timer)
    Promise.resolve().then(group.check).then((result) => { this.#answer(group, result) }, (error: unknown) => {
      for (const waiter of [...group.waiters]) waiter.reject(error)
    }).finally(() => {
      group.checking = false
      if (group.again) {
        group.again = false
        this.#check(group)
      } else if (this.#groups.get(group.key) === group) {
        this.#fallback(group)
      }
    })
  }

  #answer (group: Group, result: TrackResult): void {
    if (result.status === 'processing') return
    if (result.status === 'created') {
      // The one waiter that now owns the record runs; the others wait for its outcome.
      const [owner] = group.waiters
      if (owner === undefined) this.#unclaimed(group.key, result)
      else owner.resolve(result)
      return
    }
    for (const waiter of [...group.waiters]) waiter.resolve(result)
  }

  #fallback (group: Group): void {
    const delay = group.interval * (0.8 + Math.random() * 0.4)
    group.interval = Math.min(MAX_INTERVAL, group.interval * 2)
    group.timer = setTimeout(() => { this.#check(group) }, delay).unref()
  }
}

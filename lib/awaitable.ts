import type { Awaitable } from './stores/store.js'

/** Whether a value is a promise (or any thenable) rather than the value itself. */
export function isPromiseLike (value: unknown): value is PromiseLike<unknown> {
  return value !== null && (typeof value === 'object' || typeof value === 'function') &&
    typeof (value as PromiseLike<unknown>).then === 'function'
}

/**
 * Runs `next` on a value at once, or once its promise resolves: a synchronous store's answer
 * goes on without waiting a microtask.
 */
export function andThen<Value, Result> (value: Awaitable<Value>, next: (value: Value) => Awaitable<Result>): Awaitable<Result> {
  return isPromiseLike(value) ? (value as PromiseLike<Value>).then(next) : next(value as Value)
}

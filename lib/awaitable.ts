/** A value, or a promise of it: a store that answers in this process may answer directly. */
export type Awaitable<Value> = Value | PromiseLike<Value>

/** Whether a value is a promise (or any thenable) rather than the value itself. */
export function isPromiseLike (value: unknown): value is PromiseLike<unknown> {
  return value !== null && (typeof value === 'object' || typeof value === 'function') &&
    typeof (value as PromiseLike<unknown>).then === 'function'
}

/**
 * Runs `next` on what `run` answers: at once when it answers directly, once its promise
 * resolves otherwise. `failed`, when given, takes what `run` throws or rejects with; without it,
 * that is thrown or rejected on. One step, written once, serves a store that answers directly
 * (without waiting a single microtask) and one that answers with promises.
 */
export function step<Value, Result> (
  run: () => Awaitable<Value>,
  next: (value: Value) => Awaitable<Result>,
  failed?: (error: unknown) => Awaitable<Result>
): Awaitable<Result> {
  let value: Awaitable<Value>
  try {
    value = run()
  } catch (error) {
    if (failed === undefined) throw error
    return failed(error)
  }
  if (!isPromiseLike(value)) return next(value)
  return (value as PromiseLike<Value>).then(next, failed)
}

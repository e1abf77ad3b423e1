import { createRFC9457Error, type FastifyError } from '@fastify/error'
import createError from '@fastify/error'

/** The RFC 9457 problem fields that every error answered by the plugin carries. */
export interface IdempotencyProblem {
  /** A `tag:` URI: it names the problem type and is not meant to be fetched. */
  readonly type: string
  /** The IETF draft's title where the draft names the problem. */
  readonly title: string
  /** The human-readable explanation (the error's message). */
  readonly detail: string
  /** Response headers the error asks for; Fastify's default error handler sends `error.headers`. */
  readonly headers?: Readonly<Record<string, string>>
  toProblemDetails (instance?: string): {
    type: string
    title: string
    status: number
    detail: string
    instance: string
    code: string
    details: Record<string, unknown>
  }
}

export type IdempotencyError = FastifyError & IdempotencyProblem & { statusCode: number }

export interface IdempotencyErrorConstructor<Args extends unknown[] = []> {
  new (...args: Args): IdempotencyError
  (...args: Args): IdempotencyError
  readonly prototype: IdempotencyError
}

const kIdempotencyError = Symbol('fastify-idempotency.error')

/** Whether an error is one of the plugin's own (not any RFC 9457 error of the app's). */
export function isIdempotencyError (error: unknown): error is IdempotencyError {
  return error !== null && typeof error === 'object' && kIdempotencyError in error
}

function define<Args extends unknown[] = []> (
  code: string,
  statusCode: number,
  slug: string,
  title: string,
  message: string,
  headers?: Record<string, string>
): IdempotencyErrorConstructor<Args> {
  const type = `tag:fastify-idempotency,2026:${slug}`
  // No stack traces: these answer client mistakes and races, and capturing a stack is the
  // most expensive part of building an error on a path a busy client can hit on every retry.
  const ErrorType = createRFC9457Error(code, message, statusCode, { type, title }, Error, false)
  Object.defineProperties(ErrorType.prototype, {
    type: { value: type, enumerable: false },
    title: { value: title, enumerable: false },
    [kIdempotencyError]: { value: true, enumerable: false },
    detail: { get (this: Error) { return this.message }, enumerable: false },
    ...(headers === undefined ? {} : { headers: { value: Object.freeze(headers), enumerable: false } })
  })
  return ErrorType as unknown as IdempotencyErrorConstructor<Args>
}

/** 400: a tracked route was called without the idempotency key header. */
export const KeyMissingError = define<[header: string]>(
  'FST_IDEMPOTENCY_KEY_MISSING', 400, 'key-missing',
  'Idempotency-Key is missing',
  'The %s header is required for this operation'
)

/** 400: the idempotency key header was sent in two or more header lines. */
export const KeyMultipleError = define<[header: string]>(
  'FST_IDEMPOTENCY_KEY_MULTIPLE', 400, 'key-multiple',
  'Idempotency-Key is repeated',
  'The %s header must be sent once, not in several header lines'
)

/** 400: the key is empty, too long, malformed or has characters outside visible ASCII. */
export const KeyInvalidError = define<[header: string, maxKeyLength: number]>(
  'FST_IDEMPOTENCY_KEY_INVALID', 400, 'key-invalid',
  'Idempotency-Key is invalid',
  'The %s header must hold 1 to %d visible ASCII characters, bare or as a quoted string'
)

/**
 * 415: the request has a body that the route reads after tracking (a multipart file read in the
 * handler, a body left as a stream), so its fingerprint cannot tell payloads apart.
 */
export const BodyUnseenError = define(
  'FST_IDEMPOTENCY_BODY_UNSEEN', 415, 'body-unseen',
  'The request body cannot be fingerprinted',
  'This operation reads its request body after the idempotency check, so a key cannot be used with it'
)

/** 409: the first request with this key is still running. */
export const ConflictError = define(
  'FST_IDEMPOTENCY_CONFLICT', 409, 'conflict',
  'A request is outstanding for this Idempotency-Key',
  'A request with this idempotency key is still being processed; retry later',
  { 'retry-after': '1' }
)

/** 422: the key was used before with a different request payload. */
export const MismatchError = define(
  'FST_IDEMPOTENCY_MISMATCH', 422, 'mismatch',
  'Idempotency-Key is already used',
  'This idempotency key was already used with a different request payload'
)

/** 500: the first request with this key failed or vanished; its outcome is unknown. */
export const HaltedError = define(
  'FST_IDEMPOTENCY_HALTED', 500, 'halted',
  'The original request was interrupted',
  'The original request was interrupted and its outcome is unknown'
)

/** 503: the store failed or timed out; nothing ran. */
export const StoreUnavailableError = define(
  'FST_IDEMPOTENCY_STORE_UNAVAILABLE', 503, 'store-unavailable',
  'The idempotency store is unavailable',
  'The idempotency store could not be reached; the request was not processed, retry later',
  { 'retry-after': '5' }
)

/** Thrown at registration when the plugin is already registered in this context or an enclosing one. */
export const AlreadyRegisteredError = createError<'FST_IDEMPOTENCY_ALREADY_REGISTERED', []>(
  'FST_IDEMPOTENCY_ALREADY_REGISTERED',
  'fastify-idempotency is already registered in this context or an enclosing one: register it once'
)

/** Thrown at registration (or route declaration) for an invalid option; names the option and the rule. */
export const InvalidOptionError = createError<'FST_IDEMPOTENCY_INVALID_OPTION', [detail: string]>(
  'FST_IDEMPOTENCY_INVALID_OPTION',
  'Invalid fastify-idempotency option: %s',
  undefined,
  TypeError
)

/** Thrown by `find`, `forget` or `list` when the store has no such operation (a custom store). */
export const StoreOperationMissingError = createError<'FST_IDEMPOTENCY_STORE_OPERATION_MISSING', [operation: string]>(
  'FST_IDEMPOTENCY_STORE_OPERATION_MISSING',
  'The idempotency store has no %s method'
)

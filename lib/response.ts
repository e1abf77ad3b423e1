import { pipeline, Readable, Transform } from 'node:stream'
import type { FastifyReply } from 'fastify'
import { step, type Awaitable } from './awaitable.js'
import type { StoredResponse } from './stores/store.js'

type Headers = ReturnType<FastifyReply['getHeaders']>

/**
 * The headers a record keeps: those the handler set (the reply's headers when it sent, less the
 * ones it had before the handler ran, which the app's hooks set for each request), and the
 * content type the payload has on its way out. Headers that hooks set after the handler sent
 * (CORS at preSerialization, content coding, ETag) belong to each request and are left out, as
 * are the excluded ones.
 */
export function storedHeaders (reply: FastifyReply, before: Headers, sent: Headers, excluded: ReadonlySet<string>): StoredResponse['headers'] {
  const headers: StoredResponse['headers'] = {}
  for (const name in sent) {
    const value = sent[name]
    if (value !== undefined && value !== before[name] && !excluded.has(name)) headers[name] = value
  }
  const contentType = reply.getHeader('content-type')
  if (contentType === undefined) delete headers['content-type']
  else headers['content-type'] = contentType
  return headers
}

/** What a payload on its way through onSend is, for the record. */
export type Payload = (
  | { kind: 'body', body: Buffer | string }
  | { kind: 'stream', stream: Readable }
  | { kind: 'unknown' }
) & {
  /** The headers of a web `Response`, which the handler set as surely as with `reply.header()`. */
  headers?: Record<string, string>
}

/**
 * Reads an onSend payload. A web `Response` is opened here: Fastify would apply its status and
 * headers only after onSend, so they are applied to the reply at once and its body goes on.
 */
export function readPayload (reply: FastifyReply, payload: unknown): Payload {
  if (typeof payload === 'string' || Buffer.isBuffer(payload)) return { kind: 'body', body: payload }
  if (payload === undefined || payload === null) return { kind: 'body', body: '' }
  if (Object.prototype.toString.call(payload) === '[object Response]') {
    const response = payload as Response
    const headers = Object.fromEntries(response.headers)
    reply.code(response.status)
    reply.headers(headers)
    return { ...(response.body === null ? { kind: 'body', body: '' } : readPayload(reply, response.body)), headers }
  }
  if (payload instanceof ReadableStream) return { kind: 'stream', stream: Readable.fromWeb(payload as never) }
  if (typeof (payload as Readable).pipe === 'function') return { kind: 'stream', stream: payload as Readable }
  return { kind: 'unknown' }
}

/** The UTF-8 size of a body: a string's is at most three bytes per UTF-16 unit, so most need no count. */
export function exceeds (body: Buffer | string, limit: number): boolean {
  if (typeof body === 'string') return body.length * 3 > limit && Buffer.byteLength(body) > limit
  return body.length > limit
}

/**
 * Passes a stream's bytes on while it keeps a copy of up to `limit` bytes; `onEnd` runs before the
 * last bytes go on (so that the record is settled before the client sees the end of the body),
 * with the whole body, or `undefined` when it was larger than `limit`. `onError` is told when the
 * stream fails, or is cut short, before its end: one of the two is told, once.
 */
export function captureStream (
  source: Readable,
  limit: number,
  onEnd: (body: Buffer | undefined, size: number) => Awaitable<void>,
  onError: (error: NodeJS.ErrnoException) => void
): Readable {
  const chunks: Buffer[] = []
  let size = 0
  const capture = new Transform({
    transform (chunk: Buffer, _encoding, callback) {
      size += chunk.length
      if (size <= limit) chunks.push(chunk)
      callback(null, chunk)
    },
    flush (callback) {
      ended = true
      step(() => onEnd(size > limit ? undefined : Buffer.concat(chunks, size), size), () => { callback() })
    }
  })
  // The body was whole once flushed: a failure after that (the client leaving as the last bytes
  // go) is not the stream's.
  let ended = false
  pipeline(source, capture, (error) => {
    if (error != null && !ended) onError(error)
  })
  return capture
}

/**
 * Hands a stored response to Fastify as the handler would: its status, its headers and its body,
 * which then pass through every onSend hook (content coding, CORS headers, ETag) for this request.
 */
export function replay (reply: FastifyReply, stored: StoredResponse): void {
  reply.code(stored.statusCode)
  reply.headers(stored.headers)
  reply.header('idempotent-replayed', 'true')
  reply.send(stored.body.length === 0 ? undefined : stored.body)
}

// An HTTP date has a resolution of one second: most requests in a second share one string.
let cachedSecond = -1
let cachedDate = ''
export function httpDate (ms: number): string {
  const second = Math.floor(ms / 1000)
  if (second !== cachedSecond) {
    cachedSecond = second
    cachedDate = new Date(second * 1000).toUTCString()
  }
  return cachedDate
}

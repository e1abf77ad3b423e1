import { digestParts } from './fingerprint.js'

const QUOTE = 0x22
const BACKSLASH = 0x5c

/**
 * The key a client sent, unquoted: a bare run of visible ASCII (0x21-0x7E), or a Structured
 * Field string (RFC 8941, as the IETF draft writes the header) whose content is printable ASCII.
 * Returns `undefined` when the value is not a valid key of 1 to `maxLength` characters.
 */
export function parseKey (value: string, maxLength: number): string | undefined {
  if (value.charCodeAt(0) === QUOTE) return parseQuotedKey(value, maxLength)
  const length = value.length
  if (length === 0 || length > maxLength) return undefined
  for (let index = 0; index < length; index++) {
    const code = value.charCodeAt(index)
    if (code < 0x21 || code > 0x7e) return undefined
  }
  return value
}

function parseQuotedKey (value: string, maxLength: number): string | undefined {
  const last = value.length - 1
  if (last === 0 || value.charCodeAt(last) !== QUOTE) return undefined
  let key = ''
  let start = 1
  for (let index = 1; index < last; index++) {
    const code = value.charCodeAt(index)
    if (code === BACKSLASH) {
      const escaped = value.charCodeAt(index + 1)
      if ((escaped !== QUOTE && escaped !== BACKSLASH) || index + 1 === last) return undefined
      key += value.slice(start, index)
      start = ++index
    } else if (code === QUOTE || code < 0x20 || code > 0x7e) {
      return undefined
    }
  }
  key += value.slice(start, last)
  return key.length === 0 || key.length > maxLength ? undefined : key
}

/** How many header lines named `name` (lower case) the client sent. */
export function countHeaderLines (rawHeaders: readonly string[], name: string): number {
  let lines = 0
  for (let index = 0; index < rawHeaders.length; index += 2) {
    const rawName = rawHeaders[index] as string
    if (rawName.length === name.length && rawName.toLowerCase() === name) lines++
  }
  return lines
}

/**
 * A request as a person knows it: what the plugin builds a storage key from, for a request and
 * for an operator alike.
 */
export interface RequestIdentity {
  /** The HTTP method, upper case. */
  method: string
  /** The route's URL pattern as Fastify reports it in `request.routeOptions.url`, prefix included. */
  route: string
  /** The route's parameters, as in `request.params`. */
  params?: Record<string, unknown> | undefined
  /** The route's constraints as declared (`{ host: 'a.example.com' }`, `{ version: '2.0.0' }`). */
  constraints?: Record<string, unknown> | undefined
  /** The idempotency key as the client sent it, unquoted. */
  key: string
  /** What the route's `scope` returned, if it has one. */
  scope?: string | undefined
}

/**
 * The key under which a request is stored: the SHA-256 digest of who asked (scope), what was
 * asked (method, route, parameters and constraints) and the client's key, each written so that
 * no two identities share a text. No client text reaches the key space of a store outside this
 * process (a store in it, `inProcess`, gets that text itself), and the same key on another
 * route, another constraint or another scope is another request.
 */
export function storageKey (identity: RequestIdentity, inProcess = false): string {
  const parts = [identity.method, identity.route, identity.constraints ?? {}, identity.params ?? {}, identity.scope, identity.key]
  return digestParts(parts, inProcess ? Infinity : 0)
}

// A RegExp (a route's host constraint) has no JSON of its own: written as a mark that reads back
// as the same pattern, so that an identity a store kept names the same request again.
const writePattern = (_name: string, value: unknown): unknown => value instanceof RegExp ? { $pattern: value.source, flags: value.flags } : value
const readPattern = (_name: string, value: unknown): unknown => {
  const pattern = value as { $pattern?: unknown, flags?: unknown } | null
  return typeof pattern?.$pattern === 'string' && typeof pattern.flags === 'string' ? new RegExp(pattern.$pattern, pattern.flags) : value
}

/** JSON of a value that holds an identity, for a store outside this process. */
export function identityJson (value: unknown): string {
  return JSON.stringify(value, writePattern)
}

/** What `identityJson` wrote. */
export function parseIdentityJson<Value> (text: string): Value {
  return JSON.parse(text, readPattern) as Value
}

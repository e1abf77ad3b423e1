import { createHash, hash, type Hash } from 'node:crypto'

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
 * The key under which a request is stored: who asked (scope), what was asked (method and path)
 * and the client's key, so that keys of different scopes or endpoints never meet. A store outside
 * this process gets its SHA-256 digest, so that no client text reaches its key space; a store in
 * this process (`inProcess`) gets the text itself, which spares a hash on every request.
 */
export function storageKey (scope: string, method: string, path: string, key: string, inProcess = false): string {
  return prefixedStorageKey(storageKeyPrefix(scope, method, path), key, inProcess)
}

/** What a storage key holds before the client's key; the same for every request of a route. */
export function storageKeyPrefix (scope: string, method: string, path: string): string {
  // The scope is length-prefixed because it is the one part that may contain any character.
  return `${scope.length}:${scope}\n${method}\n${path}\n`
}

/** `storageKey` from a prefix that `storageKeyPrefix` made. */
export function prefixedStorageKey (prefix: string, key: string, inProcess: boolean): string {
  const text = prefix + key
  return inProcess ? text : hash('sha256', text, 'base64url')
}

const FLUSH_AT = 4096

/**
 * Hashes a value in a canonical form: object keys sorted, `toJSON` honoured, buffers hashed as
 * bytes. Two payloads that differ only in key order have the same fingerprint. A small value is
 * hashed in one call; a large one is fed to an incremental hash in chunks, never built into one
 * string.
 */
class Fingerprint {
  #hash: Hash | undefined
  #pending = ''

  add (value: unknown): this {
    this.#write(value)
    return this
  }

  /** The fingerprint of the canonical text: a small one as text for an in-process store, else its digest. */
  digest (inProcess: boolean): string {
    if (this.#hash === undefined) return fingerprintOf(this.#pending, inProcess)
    return this.#hash.update(this.#pending).digest('base64url')
  }

  #flush (): Hash {
    this.#hash ??= createHash('sha256')
    this.#hash.update(this.#pending)
    this.#pending = ''
    return this.#hash
  }

  #write (value: unknown): void {
    switch (typeof value) {
      case 'string':
        this.#text(JSON.stringify(value))
        return
      case 'number':
      case 'boolean':
        this.#text(String(value))
        return
      case 'bigint':
        this.#text(`${value}n`)
        return
      case 'undefined':
      case 'function':
      case 'symbol':
        this.#text('~')
        return
    }
    if (value === null) {
      this.#text('null')
    } else if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
      this.#text(`b${value.length}:`)
      this.#flush().update(value)
    } else if (Array.isArray(value)) {
      this.#text('[')
      for (let index = 0; index < value.length; index++) {
        if (index > 0) this.#text(',')
        this.#write(value[index])
      }
      this.#text(']')
    } else if (typeof (value as { toJSON?: unknown }).toJSON === 'function') {
      this.#write((value as { toJSON: () => unknown }).toJSON())
    } else {
      this.#object(value as Record<string, unknown>)
    }
  }

  #object (value: Record<string, unknown>): void {
    const names = Object.keys(value)
    if (names.length > 1) names.sort()
    this.#text('{')
    let first = true
    for (const name of names) {
      const member = value[name]
      if (member === undefined) continue
      this.#text(first ? `${JSON.stringify(name)}:` : `,${JSON.stringify(name)}:`)
      first = false
      this.#write(member)
    }
    this.#text('}')
  }

  #text (text: string): void {
    this.#pending += text
    if (this.#pending.length >= FLUSH_AT) this.#flush()
  }
}

// Canonical text up to this size is built in one piece; larger values are walked and hashed in
// chunks.
const JSON_LIMIT = 4096
// An in-process store keeps a canonical text up to this size as the fingerprint itself (below
// FLUSH_AT: such a text is never fed to a hash). What is fingerprinted is a plain object or an
// array, whose text starts with `{` or `[`, which no digest (base64url) does: a text never
// equals a digest.
const TEXT_LIMIT = 256

/**
 * The canonical text of `value` when it is what JSON writes and at most `room` characters long,
 * else `undefined`: an object's keys out of order, a value JSON writes differently (a Buffer,
 * `undefined` in an array, NaN, a `toJSON` method), members it inherits, or a value too large.
 * Parsed JSON bodies usually pass; the walk (`Fingerprint`) writes any other value. Written in
 * JavaScript: for the small bodies of most writes, that costs less than half of what
 * JSON.stringify does in a busy server, whose native code is then out of the CPU's caches.
 */
function plainJson (value: unknown, room: number): string | undefined {
  let text: string
  switch (typeof value) {
    case 'string':
      if (value.length + 2 > room) return undefined
      text = jsonString(value)
      break
    case 'number':
      if (!Number.isFinite(value)) return undefined
      text = String(value)
      break
    case 'boolean':
      text = value ? 'true' : 'false'
      break
    case 'object':
      if (value !== null) return plainStructure(value, room)
      text = 'null'
      break
    default:
      return undefined
  }
  return text.length > room ? undefined : text
}

// Each member is given the room left once the text so far, a comma and the closing bracket are
// counted, so that the whole stays within `room`.
function plainStructure (value: object, room: number): string | undefined {
  if (room < 2) return undefined
  let text: string
  if (Array.isArray(value)) {
    text = '['
    for (let index = 0; index < value.length; index++) {
      const member = plainJson(value[index], room - text.length - 2)
      if (member === undefined) return undefined
      text += index === 0 ? member : `,${member}`
    }
    return `${text}]`
  }
  const prototype = Object.getPrototypeOf(value)
  if ((prototype !== Object.prototype && prototype !== null) || typeof (value as { toJSON?: unknown }).toJSON === 'function') return undefined
  text = '{'
  let previous = ''
  for (const name in value) {
    // Members the walk would not see (inherited ones) or would sort: the walk writes this one.
    if ((text.length > 1 && !(previous < name)) || !Object.hasOwn(value, name)) return undefined
    previous = name
    const member = (value as Record<string, unknown>)[name]
    if (member === undefined) return undefined
    const quoted = jsonString(name)
    const written = plainJson(member, room - text.length - quoted.length - 3)
    if (written === undefined) return undefined
    text += `${text.length > 1 ? ',' : ''}${quoted}:${written}`
  }
  return `${text}}`
}

// A string JSON writes as it is, between quotes, unless it holds a character JSON escapes.
function jsonString (value: string): string {
  for (let index = 0; index < value.length; index++) {
    const code = value.charCodeAt(index)
    if (code < 0x20 || code === 0x22 || code === 0x5c || (code >= 0xd800 && code <= 0xdfff)) return JSON.stringify(value)
  }
  return `"${value}"`
}

function fingerprintOf (text: string, inProcess: boolean): string {
  return inProcess && text.length <= TEXT_LIMIT ? text : hash('sha256', text, 'base64url')
}

/**
 * The fingerprint of `value` (a plain object or an array) in canonical form: an in-process store
 * gets a small one as the text itself, which is one flat string to keep, any other store its
 * SHA-256 digest.
 */
function fingerprint (value: object, inProcess: boolean): string {
  const text = plainJson(value, JSON_LIMIT)
  if (text !== undefined) return fingerprintOf(text, inProcess)
  return new Fingerprint().add(value).digest(inProcess)
}

/**
 * The default fingerprint: the parsed query and body. Most writes have no query and a JSON
 * object for a body: the body alone stands for them, its text starting with `{`; any other
 * request is the array `[query, body]`, whose text starts with `[`. The two never meet.
 */
export function requestFingerprint (query: unknown, body: unknown, inProcess = false): string {
  if (!isRecord(query) || !hasNoMembers(query)) return fingerprint([query, body], inProcess)
  // An empty query, whatever members set to undefined it holds, is written as `{}`.
  return isRecord(body) ? fingerprint(body, inProcess) : fingerprint([EMPTY_QUERY, body], inProcess)
}

const EMPTY_QUERY = Object.freeze({})

/** An object whose canonical text is `{…}`. */
function isRecord (value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array) &&
    typeof (value as { toJSON?: unknown }).toJSON !== 'function'
}

/** Whether a record's canonical text is `{}`. */
function hasNoMembers (value: Record<string, unknown>): boolean {
  for (const name in value) {
    if (Object.hasOwn(value, name) && value[name] !== undefined) return false
  }
  return true
}

/** The fingerprint of what a route's `fingerprint` option returned. */
export function valueFingerprint (value: unknown, inProcess = false): string {
  return fingerprint([value], inProcess)
}

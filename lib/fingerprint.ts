import { createHash, hash, type Hash } from 'node:crypto'

// Text up to this size is hashed in one call; past it, it is fed to an incremental hash.
const FLUSH_AT = 16 * 1024

/** An array, a Map's entries, a Set's values or an object's sorted member names, being written. */
interface Frame {
  /** The items of a list, or the object whose members are written. */
  items: unknown[] | Record<string, unknown>
  /** The member names of an object, `undefined` for a list. */
  names: string[] | undefined
  index: number
  /** Whether a member was written yet (objects skip absent members). */
  written: boolean
}

/**
 * The SHA-256 digest (base64url) of `value` in a canonical form, or that form itself when it is
 * at most `textUpTo` characters long (for a store in this process; no digest starts with `[`,
 * `{` or `"`, so the two never meet). In the canonical form object keys are sorted, and every
 * kind of value is written with a mark of its own, so that two values share a digest only when
 * they are equal. Plain JSON values are written as canonical JSON (strings, lone surrogates included, as
 * JSON writes them); beyond JSON, `Map` and `Set` count by their entries, `BigInt` as such, and
 * buffers, typed arrays and `ArrayBuffer` by their bytes; an object with `toJSON` (a `Date`) counts
 * as what it returns. An object seen before on the way (a cycle, or a shared reference) is written
 * as a reference to where it was first seen. The walk keeps its own stack, so no nesting is too
 * deep. Streams count as a mark only: their bytes are not in the value. Functions, symbols and
 * `undefined` count as absent in an object, as in JSON, and as `~` in a list.
 */
export function digest (value: unknown, textUpTo = 0): string {
  const writer = new CanonicalWriter()
  writer.write(value)
  return writer.result(textUpTo)
}

/**
 * The digest of a list of parts, as `digest` gives it for the array of them, except that each
 * part is written on its own: an object that two parts share (the same empty object for two
 * absent parts) is written out in both.
 */
export function digestParts (parts: readonly unknown[], textUpTo = 0): string {
  const writer = new CanonicalWriter()
  for (let index = 0; index < parts.length; index++) {
    writer.text(index === 0 ? '[' : ',')
    writer.write(parts[index])
  }
  writer.text(']')
  return writer.result(textUpTo)
}

class CanonicalWriter {
  // The text not yet hashed.
  #text = ''
  #hash: Hash | undefined
  #seen = new Map<object, number>()
  #frames: Frame[] = []

  text (text: string): void {
    this.#append(text)
  }

  write (root: unknown): void {
    this.#seen.clear()
    this.#value(root)
    const frames = this.#frames
    while (frames.length > 0) {
      const frame = frames[frames.length - 1] as Frame
      const names = frame.names
      if (names === undefined) {
        const items = frame.items as unknown[]
        if (frame.index === items.length) {
          frames.pop()
          this.#append(']')
        } else {
          if (frame.index > 0) this.#append(',')
          this.#value(items[frame.index++])
        }
        continue
      }
      const name = names[frame.index++]
      if (name === undefined) {
        frames.pop()
        this.#append('}')
        continue
      }
      const member = (frame.items as Record<string, unknown>)[name]
      if (member === undefined || typeof member === 'function' || typeof member === 'symbol') continue
      this.#append(`${frame.written ? ',' : ''}${quote(name)}:`)
      frame.written = true
      this.#value(member)
    }
  }

  // The canonical text itself when it is at most `textUpTo` characters long, else its digest.
  result (textUpTo: number): string {
    const text = this.#text
    if (this.#hash !== undefined) return this.#hash.update(text).digest('base64url')
    if (text.length > textUpTo) return hash('sha256', text, 'base64url')
    // Built with +=, the text is a rope of a node per piece, which a store in this process would
    // keep: reading a character of it makes V8 flatten it into one string.
    text.charCodeAt(0)
    return text
  }

  #append (text: string): void {
    this.#text += text
    if (this.#text.length >= FLUSH_AT) this.#flush()
  }

  #flush (): Hash {
    this.#hash ??= createHash('sha256')
    this.#hash.update(this.#text)
    this.#text = ''
    return this.#hash
  }

  #bytes (tag: string, bytes: Uint8Array): void {
    this.#append(`${tag}${bytes.byteLength}:`)
    this.#flush().update(bytes)
  }

  // Writes a primitive at once; an array, a Map, a Set or an object opens a frame.
  #value (value: unknown): void {
    switch (typeof value) {
      case 'string':
        this.#append(quote(value))
        return
      case 'number':
      case 'boolean':
        this.#append(String(value))
        return
      case 'bigint':
        this.#append(`${value}n`)
        return
      case 'object':
        if (value === null) this.#append('null')
        else this.#object(value)
        return
      default:
        // undefined, a function or a symbol: what JSON writes as null in an array.
        this.#append('~')
    }
  }

  #object (value: object): void {
    const seen = this.#seen.get(value)
    if (seen !== undefined) {
      this.#append(`@${seen}`)
      return
    }
    this.#seen.set(value, this.#seen.size)
    const prototype = Object.getPrototypeOf(value)
    // Parsed JSON is made of plain objects and arrays: they are told apart first.
    if ((prototype === Object.prototype || prototype === null) && typeof (value as { toJSON?: unknown }).toJSON !== 'function') {
      this.#members(value as Record<string, unknown>)
    } else if (Array.isArray(value)) {
      this.#open('[', value, undefined)
    } else if (ArrayBuffer.isView(value)) {
      this.#bytes(`b${Object.prototype.toString.call(value).slice(8, -1)}`, new Uint8Array(value.buffer, value.byteOffset, value.byteLength))
    } else if (value instanceof ArrayBuffer || value instanceof SharedArrayBuffer) {
      this.#bytes('B', new Uint8Array(value))
    } else if (value instanceof Map) {
      this.#open('M[', [...value], undefined)
    } else if (value instanceof Set) {
      this.#open('S[', [...value], undefined)
    } else if (value instanceof RegExp) {
      this.#append(`/${quote(value.source)}/${value.flags}`)
    } else if (typeof (value as { pipe?: unknown }).pipe === 'function') {
      this.#append('R')
    } else if (typeof (value as { toJSON?: unknown }).toJSON === 'function') {
      this.#value((value as { toJSON: () => unknown }).toJSON())
    } else {
      this.#members(value as Record<string, unknown>)
    }
  }

  #members (value: Record<string, unknown>): void {
    const names = Object.keys(value)
    this.#open('{', value, names.length > 1 ? names.sort() : names)
  }

  #open (mark: string, items: Frame['items'], names: string[] | undefined): void {
    this.#append(mark)
    this.#frames.push({ items, names, index: 0, written: false })
  }
}

// A string as JSON writes it: as it is between quotes, unless it holds a character JSON escapes.
// JSON writes lone surrogates as \u escapes, so the text stays well-formed and its UTF-8 bytes
// tell every string apart.
function quote (value: string): string {
  for (let index = 0; index < value.length; index++) {
    const code = value.charCodeAt(index)
    if (code < 0x20 || code === 0x22 || code === 0x5c || (code >= 0xd800 && code <= 0xdfff)) return JSON.stringify(value)
  }
  return `"${value}"`
}

/**
 * The default fingerprint of a request: its media type (so that JSON `"abc"` and `text/plain`
 * `abc` differ; parameters such as a multipart boundary do not count), its parsed query and body.
 */
export function requestFingerprint (contentType: string | undefined, query: unknown, body: unknown, textUpTo = 0): string {
  const semicolon = contentType === undefined ? -1 : contentType.indexOf(';')
  const mediaType = contentType === undefined ? '' : (semicolon === -1 ? contentType : contentType.slice(0, semicolon)).trim().toLowerCase()
  return digestParts([mediaType, query, body], textUpTo)
}

import { randomBytes } from 'node:crypto'

/** A completed record's fields, as the memory store hands them to the ring. */
export interface RingRecord {
  expiresAt: number
  /** Completion order across the memory store, which keeps some records outside the ring. */
  sequence: number
  /** Bytes the memory store accounts to the record. */
  size: number
  headersId: number
  statusCode: number
  fingerprint: string
  body: Buffer | string
  /** The body's bytes in the ring: its length, or `textBytes` of text. */
  bodyBytes: number
}

/** Where a walk over the ring's records stands (see `RecordRing.next`). */
export interface RingCursor {
  at: number
  /** Bytes the ring's head had passed, in all, when it stood at `at`. */
  passed: number
}

// A record is a header of numbers, then its key, fingerprint and body, padded to a multiple of 8
// bytes. Indexes below are into the ring's Uint32Array or Float64Array views, from the record's start.
const LENGTH = 0
const FLAGS = 1
const EXPIRES_AT = 1 // Float64Array: bytes 8 to 15
const SEQUENCE = 2 // Float64Array: bytes 16 to 23
const HASH = 6
const SIZE = 7
const HEADERS_ID = 8
const STATUS_CODE = 9
const KEY_BYTES = 10
const FINGERPRINT_BYTES = 11
const BODY_BYTES = 12
const HEADER_BYTES = 56

const LIVE = 1
// Fills the end of the ring that a record did not fit in: the next record is at offset 0.
const PAD = 2
const BUFFER_BODY = 4
// Text is kept as Latin-1 bytes when it is all ASCII, else as UTF-16 units: either way, exactly.
const KEY_UTF16 = 8
const FINGERPRINT_UTF16 = 16
const BODY_UTF16 = 32

// A larger body is better kept as the object it is: it alone outweighs an object's cost to the
// garbage collector, and a replay would copy it out of the ring.
const BODY_LIMIT = 16 * 1024

/**
 * The memory store's completed records, outside V8's heap: one Buffer holds them in the order
 * they were stored, oldest first, and an open-addressing table of offsets finds them by key. The
 * garbage collector sees a few objects, however many records there are; a record costs no object
 * until it is read.
 *
 * The Buffer and the table are allocated at their full size when the first record arrives, and
 * never move: the pages of memory they take are only those written to, and no record is ever
 * copied (a copy of a large ring would hold the event loop for tens of milliseconds). A record
 * that needs room takes it from the oldest (`onDrop` is told of each live one that goes); the
 * room of a record removed before its turn is taken again when the ring comes round to it.
 */
export class RecordRing {
  readonly maxCapacity: number
  /** Live records it holds at most: it drops the oldest rather than hold more. */
  readonly maxCount: number
  #onDrop: (at: number) => void
  #buffer = Buffer.alloc(0)
  #u32 = new Uint32Array(0)
  #f64 = new Float64Array(0)
  #head = 0
  #tail = 0
  /** Bytes from head to tail: records, removed ones and padding. */
  #used = 0
  #headPassed = 0
  // Linear probing, load at most one half. Slot i is two numbers, at 2i and 2i + 1, so that a
  // probe reads one cache line: the record's offset + 1 (0 when the slot is empty) and its hash.
  #slots = new Int32Array(2)
  #mask = 0
  #count = 0
  // HalfSipHash-1-3's key, of this process's own: keys are the client's text, and a keyed hash
  // keeps anyone who does not know it from choosing keys that collide.
  #k0: number
  #k1: number

  constructor (maxCapacity: number, maxCount: number, onDrop: (at: number) => void) {
    this.maxCapacity = maxCapacity - (maxCapacity % 8)
    this.maxCount = maxCount
    this.#onDrop = onDrop
    const key = randomBytes(8)
    this.#k0 = key.readInt32LE(0)
    this.#k1 = key.readInt32LE(4)
  }

  /** Live records. */
  get count (): number {
    return this.#count
  }

  /** HalfSipHash-1-3 of the key's UTF-16 units, two to a word. */
  hash (key: string): number {
    let v0 = this.#k0
    let v1 = this.#k1
    let v2 = this.#k0 ^ 0x6c796765
    let v3 = this.#k1 ^ 0x74656462
    const length = key.length
    const last = length - (length & 1)
    for (let index = 0; index <= last; index += 2) {
      // The last word holds the odd unit, if any, and the length in bytes in its top byte.
      const word = index < last
        ? key.charCodeAt(index) | (key.charCodeAt(index + 1) << 16)
        : (index < length ? key.charCodeAt(index) : 0) | (length << 25)
      v3 ^= word
      v0 = (v0 + v1) | 0; v1 = rotate(v1, 5) ^ v0; v0 = rotate(v0, 16)
      v2 = (v2 + v3) | 0; v3 = rotate(v3, 8) ^ v2
      v0 = (v0 + v3) | 0; v3 = rotate(v3, 7) ^ v0
      v2 = (v2 + v1) | 0; v1 = rotate(v1, 13) ^ v2; v2 = rotate(v2, 16)
      v0 ^= word
    }
    v2 ^= 0xff
    for (let round = 0; round < 3; round++) {
      v0 = (v0 + v1) | 0; v1 = rotate(v1, 5) ^ v0; v0 = rotate(v0, 16)
      v2 = (v2 + v3) | 0; v3 = rotate(v3, 8) ^ v2
      v0 = (v0 + v3) | 0; v3 = rotate(v3, 7) ^ v0
      v2 = (v2 + v1) | 0; v1 = rotate(v1, 13) ^ v2; v2 = rotate(v2, 16)
    }
    return v1 ^ v3
  }

  /** The offset of the live record under `key`, or -1. */
  find (key: string, hash: number): number {
    const slots = this.#slots
    const mask = this.#mask
    for (let slot = hash & mask; slots[slot * 2] !== 0; slot = (slot + 1) & mask) {
      if (slots[slot * 2 + 1] === hash) {
        const at = (slots[slot * 2] as number) - 1
        if (this.#holdsKey(at, key)) return at
      }
    }
    return -1
  }

  /**
   * Stores a record under `key` (which holds no live record) and answers its offset, or -1 when
   * its body is over 16 KiB or it is larger than half the ring could ever be: the caller keeps
   * such a record itself.
   */
  add (key: string, hash: number, record: RingRecord): number {
    if (record.bodyBytes > BODY_LIMIT) return -1
    const keyBytes = textBytes(key)
    const keyWide = keyBytes !== key.length
    const fingerprintBytes = textBytes(record.fingerprint)
    const fingerprintWide = fingerprintBytes !== record.fingerprint.length
    const body = record.body
    const bodyIsBuffer = typeof body !== 'string'
    const bodyBytes = record.bodyBytes
    const bodyWide = !bodyIsBuffer && bodyBytes !== body.length
    const length = (HEADER_BYTES + keyBytes + fingerprintBytes + bodyBytes + 7) & ~7
    if (length > this.maxCapacity / 2) return -1
    if (this.#buffer.byteLength === 0) this.#allocate()
    while (this.#count >= this.maxCount) this.#dropHead()
    const at = this.#reserve(length)
    const buffer = this.#buffer
    const u32 = this.#u32
    const word = at >> 2
    u32[word + LENGTH] = length
    u32[word + FLAGS] = LIVE | (bodyIsBuffer ? BUFFER_BODY : 0) | (keyWide ? KEY_UTF16 : 0) | (fingerprintWide ? FINGERPRINT_UTF16 : 0) | (bodyWide ? BODY_UTF16 : 0)
    u32[word + HASH] = hash
    u32[word + SIZE] = record.size
    this.#f64[(at >> 3) + EXPIRES_AT] = record.expiresAt
    this.#f64[(at >> 3) + SEQUENCE] = record.sequence
    u32[word + HEADERS_ID] = record.headersId
    u32[word + STATUS_CODE] = record.statusCode
    u32[word + KEY_BYTES] = keyBytes
    u32[word + FINGERPRINT_BYTES] = fingerprintBytes
    u32[word + BODY_BYTES] = bodyBytes
    let next = at + HEADER_BYTES
    next += writeText(buffer, key, next, keyWide)
    next += writeText(buffer, record.fingerprint, next, fingerprintWide)
    if (bodyIsBuffer) buffer.set(body, next)
    else writeText(buffer, body, next, bodyWide)
    this.#index(hash, at)
    this.#count++
    return at
  }

  /** Removes the live record at `at`: it no longer answers to its key, and its bytes are reused. */
  remove (at: number): void {
    const u32 = this.#u32
    u32[(at >> 2) + FLAGS] = (u32[(at >> 2) + FLAGS] as number) & ~LIVE
    this.#unindex(at)
    this.#count--
    if (at === this.#head) this.#dropRemoved()
  }

  /** The oldest live record's offset, or -1 when there is none. */
  oldest (): number {
    this.#dropRemoved()
    return this.#used === 0 ? -1 : this.#head
  }

  expiresAt (at: number): number {
    return this.#f64[(at >> 3) + EXPIRES_AT] as number
  }

  sequence (at: number): number {
    return this.#f64[(at >> 3) + SEQUENCE] as number
  }

  size (at: number): number {
    return this.#u32[(at >> 2) + SIZE] as number
  }

  headersId (at: number): number {
    return this.#u32[(at >> 2) + HEADERS_ID] as number
  }

  statusCode (at: number): number {
    return this.#u32[(at >> 2) + STATUS_CODE] as number
  }

  fingerprint (at: number): string {
    const start = at + HEADER_BYTES + (this.#u32[(at >> 2) + KEY_BYTES] as number)
    const end = start + (this.#u32[(at >> 2) + FINGERPRINT_BYTES] as number)
    return this.#buffer.toString(this.#flag(at, FINGERPRINT_UTF16) ? 'utf16le' : 'latin1', start, end)
  }

  /** Whether the record's fingerprint is `fingerprint`: a replay compares it without a copy. */
  hasFingerprint (at: number, fingerprint: string): boolean {
    const word = at >> 2
    const start = at + HEADER_BYTES + (this.#u32[word + KEY_BYTES] as number)
    return this.#holds(start, this.#u32[word + FINGERPRINT_BYTES] as number, this.#flag(at, FINGERPRINT_UTF16), fingerprint)
  }

  /** The body, as text or a Buffer as it was given: a copy, since the ring reuses its bytes. */
  body (at: number): Buffer | string {
    const word = at >> 2
    const start = at + HEADER_BYTES + (this.#u32[word + KEY_BYTES] as number) + (this.#u32[word + FINGERPRINT_BYTES] as number)
    const end = start + (this.#u32[word + BODY_BYTES] as number)
    if (!this.#flag(at, BUFFER_BODY)) return this.#buffer.toString(this.#flag(at, BODY_UTF16) ? 'utf16le' : 'latin1', start, end)
    const copy = Buffer.allocUnsafe(end - start)
    this.#buffer.copy(copy, 0, start, end)
    return copy
  }

  /** A walk over the live records, oldest first, that records added meanwhile join. */
  cursor (): RingCursor {
    return { at: this.#head, passed: this.#headPassed }
  }

  /**
   * The next live record of a walk, or -1 at its end. A walk goes on from the head if the records
   * it stood among went meanwhile.
   */
  next (cursor: RingCursor): number {
    // A walk at the head goes on from it wherever it is now: an emptied ring starts again at 0.
    if (cursor.passed <= this.#headPassed) {
      cursor.at = this.#head
      cursor.passed = this.#headPassed
    }
    const u32 = this.#u32
    while (cursor.passed < this.#headPassed + this.#used) {
      const at = cursor.at
      const length = u32[at >> 2] as number
      const live = ((u32[(at >> 2) + FLAGS] as number) & LIVE) !== 0
      cursor.at = at + length === this.#buffer.byteLength ? 0 : at + length
      cursor.passed += length
      if (live) return at
    }
    return -1
  }

  // Makes room for `length` contiguous bytes at the tail, and takes them.
  #reserve (length: number): number {
    for (;;) {
      const capacity = this.#buffer.byteLength
      if (this.#used === 0) {
        this.#head = 0
        this.#tail = 0
      }
      const head = this.#head
      const tail = this.#tail
      // Head and tail meet only when the ring is empty (both then 0) or full.
      if (this.#used < capacity) {
        if (tail >= head) {
          if (capacity - tail >= length) return this.#take(length)
          // The end is too short: padding fills it, and the record goes to the start.
          if (head >= length) {
            this.#u32[tail >> 2] = capacity - tail
            this.#u32[(tail >> 2) + FLAGS] = PAD
            this.#used += capacity - tail
            this.#tail = 0
            return this.#take(length)
          }
        } else if (head - tail >= length) {
          return this.#take(length)
        }
      }
      this.#dropHead()
    }
  }

  #take (length: number): number {
    const at = this.#tail
    this.#used += length
    this.#tail = at + length === this.#buffer.byteLength ? 0 : at + length
    return at
  }

  #dropHead (): void {
    const at = this.#head
    const length = this.#u32[at >> 2] as number
    const flags = this.#u32[(at >> 2) + FLAGS] as number
    if ((flags & LIVE) !== 0) {
      this.#onDrop(at)
      this.#unindex(at)
      this.#count--
    }
    this.#used -= length
    this.#headPassed += length
    this.#head = at + length === this.#buffer.byteLength ? 0 : at + length
  }

  // Removed records and padding at the head go at once: the oldest is then a live record.
  #dropRemoved (): void {
    while (this.#used > 0 && ((this.#u32[(this.#head >> 2) + FLAGS] as number) & LIVE) === 0) this.#dropHead()
  }

  #allocate (): void {
    this.#buffer = Buffer.allocUnsafeSlow(this.maxCapacity)
    this.#u32 = new Uint32Array(this.#buffer.buffer)
    this.#f64 = new Float64Array(this.#buffer.buffer)
    let slots = 2
    while (slots < this.maxCount * 2) slots *= 2
    this.#slots = new Int32Array(slots * 2)
    this.#mask = slots - 1
  }

  #flag (at: number, flag: number): boolean {
    return ((this.#u32[(at >> 2) + FLAGS] as number) & flag) !== 0
  }

  #holdsKey (at: number, key: string): boolean {
    return this.#holds(at + HEADER_BYTES, this.#u32[(at >> 2) + KEY_BYTES] as number, this.#flag(at, KEY_UTF16), key)
  }

  // Whether the ring's bytes at `start` are `text`, kept as UTF-16 (`wide`) or Latin-1.
  #holds (start: number, bytes: number, wide: boolean, text: string): boolean {
    const buffer = this.#buffer
    if (wide) {
      if (bytes !== text.length * 2) return false
      for (let index = 0; index < text.length; index++) {
        if (((buffer[start + index * 2] as number) | ((buffer[start + index * 2 + 1] as number) << 8)) !== text.charCodeAt(index)) return false
      }
      return true
    }
    if (bytes !== text.length) return false
    for (let index = 0; index < bytes; index++) {
      if (buffer[start + index] !== text.charCodeAt(index)) return false
    }
    return true
  }

  #index (hash: number, at: number): void {
    const slots = this.#slots
    const mask = this.#mask
    let slot = hash & mask
    while (slots[slot * 2] !== 0) slot = (slot + 1) & mask
    slots[slot * 2] = at + 1
    slots[slot * 2 + 1] = hash
  }

  // Linear probing's deletion: the records after the emptied slot that would no longer be found
  // move back into it, so that no slot needs a mark of its own.
  #unindex (at: number): void {
    const slots = this.#slots
    const mask = this.#mask
    let hole = (this.#u32[(at >> 2) + HASH] as number) & mask
    while (slots[hole * 2] !== at + 1) hole = (hole + 1) & mask
    for (let slot = (hole + 1) & mask; slots[slot * 2] !== 0; slot = (slot + 1) & mask) {
      const home = (slots[slot * 2 + 1] as number) & mask
      // The record at `slot` may move to the hole unless its home lies cyclically in (hole, slot].
      const stays = hole <= slot ? home > hole && home <= slot : home > hole || home <= slot
      if (!stays) {
        slots[hole * 2] = slots[slot * 2] as number
        slots[hole * 2 + 1] = slots[slot * 2 + 1] as number
        hole = slot
      }
    }
    slots[hole * 2] = 0
  }

}

function rotate (word: number, bits: number): number {
  return (word << bits) | (word >>> (32 - bits))
}

// Short one-byte text is copied in JavaScript: a call into Node's native code costs more.
function writeText (buffer: Buffer, text: string, at: number, wide: boolean): number {
  if (wide || text.length > 64) return buffer.write(text, at, wide ? 'utf16le' : 'latin1')
  for (let index = 0; index < text.length; index++) buffer[at + index] = text.charCodeAt(index)
  return text.length
}

/** Bytes text takes in the ring: one per character when it is all ASCII, else two (UTF-16). */
export function textBytes (text: string): number {
  // Short text is looked at in JavaScript; longer text is counted by Node, which is faster there.
  if (text.length > 64) return Buffer.byteLength(text) === text.length ? text.length : text.length * 2
  for (let index = 0; index < text.length; index++) {
    if (text.charCodeAt(index) > 0x7f) return text.length * 2
  }
  return text.length
}

import Type from 'typebox'
import { compileOptions, withDefault } from '../options-validator.js'
import type {
  Awaitable,
  IdempotencyRecord,
  IdempotencyStore,
  InsertResult,
  NewRecord,
  RecordState,
  RecordUpdate,
  StoredResponse
} from './store.js'

/** The logger methods the memory store uses; a Fastify/pino logger fits. */
export interface WarningLogger {
  warn (object: object, message: string): void
}

const MemoryStoreOptionsSchema = Type.Object({
  maxBytes: Type.Optional(withDefault(Type.Integer({ minimum: 1024 }), 64 * 1024 * 1024)),
  now: Type.Optional(Type.Unsafe<() => number>(Type.Function([], Type.Number()))),
  logger: Type.Optional(Type.Unsafe<WarningLogger>(Type.Object({ warn: Type.Function([], Type.Any()) })))
}, { additionalProperties: false })

export interface MemoryStoreOptions {
  /** Bytes of stored responses (bodies, headers and bookkeeping) kept at most. Default 64 MiB. */
  maxBytes?: number
  /** The clock, in ms since the epoch. Default `Date.now`. */
  now?: () => number
  /** Told when records are evicted to stay under `maxBytes`. */
  logger?: WarningLogger
}

interface Entry {
  state: RecordState
  fingerprint: string
  owner: string
  expiresAt: number
  leaseExpiresAt: number
  /** The lease was renewed: the request ran long. */
  renewed: boolean
  /** Eviction found it running or halted and set it aside in #held, out of the eviction order. */
  held: boolean
  // The response of a completed record that is not packed into a string (a Buffer body, or a
  // fingerprint of two-byte text), kept in the entry itself: every object kept is work for the
  // garbage collector for as long as it lives.
  statusCode: number
  headers: StoredResponse['headers'] | undefined
  body: StoredResponse['body'] | undefined
  size: number
}

/**
 * A record as the store keeps it: a completed record with a text body as one string (see
 * `packCompleted`), any other record as an entry.
 */
type Slot = Entry | string

type Headers = StoredResponse['headers']

interface HeaderSet {
  id: number
  headers: Headers
  /** Packed records that refer to it. */
  uses: number
}

const validateOptions = compileOptions(MemoryStoreOptionsSchema, { subject: 'MemoryStore', prefix: '' })
const ENTRY_OVERHEAD = 160
const INSERTED: InsertResult = Object.freeze({ inserted: true })
const EVICTION_WARNING_INTERVAL = 60_000
// Records set aside by eviction are looked over for expired ones at most this often.
const HELD_SWEEP_INTERVAL = 1000
// Records prune() looks at in one turn of the event loop: about 0.1 to 1 ms.
const PRUNE_CHUNK = 5000
// V8 keeps a string at two bytes per character once one character needs it: a fingerprint with
// one would double the memory of the body packed with it, beyond what maxBytes counts.
const TWO_BYTE = /[^\u0000-\u00ff]/
const SPACE = 0x20
const ZERO = 0x30
const NINE = 0x39

/**
 * Keeps records in this process: for one instance, tests and development. It answers at once,
 * without promises, so a tracked request costs no extra turn of the event loop (only `prune` of a
 * large store answers through a promise, walking it a chunk per turn).
 * Bounded by `maxBytes`: when full it evicts the oldest completed records, never in-flight or halted ones (a halted
 * record stands for an outcome nobody knows; forgetting it would let a retry run again).
 *
 * @example
 * await app.register(idempotency, { store: new MemoryStore({ maxBytes: 16 * 1024 * 1024 }) })
 */
export class MemoryStore implements IdempotencyStore {
  readonly inProcess = true
  readonly maxBytes: number
  #now: () => number
  #logger: WarningLogger | undefined
  // Map order is the eviction order: a request's start, or its end for one that ran long or that
  // eviction set aside while it ran.
  #records = new Map<string, Slot>()
  // Running and halted records that eviction met: kept out of its way, so that no sweep steps
  // over them again (a store full of halted records would otherwise cost a whole sweep per
  // insert). A record leaves when it completes (to the back of #records), expires or goes.
  #held = new Map<string, Entry>()
  // When #held may hold an expired record: its earliest expiry, but at most once a
  // HELD_SWEEP_INTERVAL, since a sweep of #held costs one step per record in it.
  #heldSweepAt = Infinity
  // Where eviction goes on from. A Map marks deleted entries and compacts only now and then: a
  // new iterator for every eviction would step over all the entries evicted since, on every insert.
  #evictionCursor: MapIterator<[string, Slot]> | undefined
  // The header sets of packed records, by number, since a string cannot hold an object. The
  // plugin hands a route's records one frozen object for as long as their headers stay the same
  // (the Expires header changes each second). A set is forgotten when its last record goes.
  #headerSets = new Map<Headers, HeaderSet>()
  #headerSetsById: Array<HeaderSet | undefined> = []
  #freeHeaderIds: number[] = []
  #bytes = 0
  #evictedSinceWarning = 0
  #lastWarningAt = -Infinity

  constructor (options: MemoryStoreOptions = {}) {
    const settings = validateOptions(options)
    this.maxBytes = settings.maxBytes
    this.#now = settings.now ?? Date.now
    this.#logger = settings.logger
  }

  /** Bytes currently accounted to stored records. */
  get size (): number {
    return this.#bytes
  }

  insert (key: string, record: NewRecord): InsertResult {
    const now = this.#now()
    const existing = this.#find(key)
    if (existing !== undefined) {
      if (typeof existing === 'string') {
        const completed = this.#unpack(existing)
        if (completed.expiresAt > now) return { inserted: false, record: completed }
      } else if (existing.expiresAt > now) {
        const leaseExpired = existing.state === 'processing' && existing.leaseExpiresAt <= now
        const takeOver = leaseExpired && record.takeOverExpiredLease && existing.fingerprint === record.fingerprint
        if (!takeOver) return { inserted: false, record: toRecord(existing, leaseExpired) }
      }
      this.#remove(key, existing)
    }
    const size = ENTRY_OVERHEAD + key.length + record.fingerprint.length + record.owner.length
    this.#records.set(key, {
      state: 'processing',
      fingerprint: record.fingerprint,
      owner: record.owner,
      expiresAt: record.expiresAt,
      leaseExpiresAt: now + record.lease,
      renewed: false,
      held: false,
      statusCode: 0,
      headers: undefined,
      body: undefined,
      size
    })
    this.#grow(size, now)
    return INSERTED
  }

  lookup (key: string): IdempotencyRecord | undefined {
    const now = this.#now()
    const entry = this.#find(key)
    if (entry === undefined) return undefined
    const record = typeof entry === 'string' ? this.#unpack(entry) : toRecord(entry, entry.state === 'processing' && entry.leaseExpiresAt <= now)
    return record.expiresAt > now ? record : undefined
  }

  update (key: string, owner: string, update: RecordUpdate): boolean {
    const now = this.#now()
    const entry = this.#find(key)
    if (entry === undefined || typeof entry === 'string' || entry.owner !== owner || entry.state !== 'processing' || entry.expiresAt <= now) {
      return false
    }
    if (update.state === 'processing') {
      entry.leaseExpiresAt = now + update.lease
      entry.expiresAt = Math.max(entry.expiresAt, entry.leaseExpiresAt)
      entry.renewed = true
      return true
    }
    entry.state = update.state
    entry.expiresAt = update.expiresAt
    entry.owner = ''
    if (entry.held && update.state === 'halted') this.#heldUntil(update.expiresAt, now)
    if (update.state === 'completed') {
      const response = update.response
      const added = responseSize(response)
      entry.size += added
      let slot: Slot = entry
      if (typeof response.body === 'string' && !TWO_BYTE.test(entry.fingerprint)) {
        slot = packCompleted(update.expiresAt, entry.size, this.#useHeaders(response.headers), response.statusCode, entry.fingerprint, response.body)
      } else {
        entry.statusCode = response.statusCode
        entry.headers = response.headers
        entry.body = ownBytes(response.body)
      }
      // A request that ran long enough to renew its lease is the one whose client most likely
      // timed out and will retry: it moves to the back, as one set aside does. Others keep their place.
      if (entry.held || entry.renewed) {
        this.#mapOf(entry).delete(key)
        entry.held = false
      }
      this.#records.set(key, slot)
      this.#grow(added, now, key)
    }
    return true
  }

  delete (key: string, owner: string): boolean {
    const entry = this.#find(key)
    if (entry === undefined || typeof entry === 'string' || entry.owner !== owner || entry.state !== 'processing' || entry.expiresAt <= this.#now()) {
      return false
    }
    this.#remove(key, entry)
    return true
  }

  /**
   * Removes expired records. A store of up to PRUNE_CHUNK records is pruned at once; a larger one
   * in chunks, one per turn of the event loop, so that requests go on meanwhile (answers through
   * a promise then).
   */
  prune (): Awaitable<number> {
    return this.#pruneChunk(this.#records.entries(), this.#held.entries(), 0)
  }

  // The iterators are live: records added or set aside meanwhile are visited too. #heldSweepAt
  // is left as it is: at worst early, which costs one sweep of #held that finds less to remove.
  #pruneChunk (records: MapIterator<[string, Slot]>, held: MapIterator<[string, Entry]>, removed: number): Awaitable<number> {
    const now = this.#now()
    for (let steps = 0; steps < PRUNE_CHUNK; steps++) {
      let next: IteratorResult<[string, Slot]> = records.next()
      if (next.done === true) next = held.next()
      if (next.done === true) {
        // A cursor left over from before the Map resized would keep its old table, and with it
        // records removed since, alive: the next eviction starts afresh from a compacted Map.
        this.#evictionCursor = undefined
        return removed
      }
      const [key, entry] = next.value
      if (expiresAtOf(entry) <= now) {
        this.#remove(key, entry)
        removed++
      }
    }
    return new Promise<void>((resolve) => { setImmediate(resolve) })
      .then(() => this.#pruneChunk(records, held, removed))
  }

  // Most stores never set a record aside: a lookup then costs one Map lookup.
  #find (key: string): Slot | undefined {
    const entry = this.#records.get(key)
    return entry !== undefined || this.#held.size === 0 ? entry : this.#held.get(key)
  }

  #mapOf (entry: Slot): Map<string, Slot> {
    return typeof entry !== 'string' && entry.held ? this.#held : this.#records
  }

  #remove (key: string, entry: Slot): void {
    this.#mapOf(entry).delete(key)
    if (typeof entry === 'string') {
      // The packed size and header set, the second and third numbers.
      const sizeStart = entry.indexOf(' ') + 1
      this.#bytes -= packedInteger(entry, sizeStart)
      this.#releaseHeaders(packedInteger(entry, entry.indexOf(' ', sizeStart) + 1))
    } else {
      this.#bytes -= entry.size
    }
  }

  #useHeaders (headers: Headers): number {
    let set = this.#headerSets.get(headers)
    if (set === undefined) {
      set = { id: this.#freeHeaderIds.pop() ?? this.#headerSetsById.length, headers, uses: 0 }
      this.#headerSetsById[set.id] = set
      this.#headerSets.set(headers, set)
    }
    set.uses++
    return set.id
  }

  #releaseHeaders (id: number): void {
    const set = this.#headerSetsById[id] as HeaderSet
    if (--set.uses > 0) return
    this.#headerSets.delete(set.headers)
    this.#headerSetsById[id] = undefined
    this.#freeHeaderIds.push(id)
  }

  #unpack (packed: string): IdempotencyRecord {
    const expiresEnd = packed.indexOf(' ')
    const sizeEnd = packed.indexOf(' ', expiresEnd + 1)
    const headersEnd = packed.indexOf(' ', sizeEnd + 1)
    const statusEnd = packed.indexOf(' ', headersEnd + 1)
    const lengthEnd = packed.indexOf(' ', statusEnd + 1)
    const bodyStart = lengthEnd + 1 + packedInteger(packed, statusEnd + 1)
    const headers = (this.#headerSetsById[packedInteger(packed, sizeEnd + 1)] as HeaderSet).headers
    return {
      state: 'completed',
      fingerprint: packed.slice(lengthEnd + 1, bodyStart),
      expiresAt: packedExpiresAt(packed),
      leaseExpired: false,
      response: { statusCode: Number(packed.slice(headersEnd + 1, statusEnd)), headers, body: packed.slice(bodyStart) }
    }
  }

  #hold (key: string, entry: Entry, now: number): void {
    this.#records.delete(key)
    entry.held = true
    this.#held.set(key, entry)
    this.#heldUntil(entry.expiresAt, now)
  }

  #heldUntil (expiresAt: number, now: number): void {
    this.#heldSweepAt = Math.min(this.#heldSweepAt, Math.max(expiresAt, now + HELD_SWEEP_INTERVAL))
  }

  #sweepHeld (now: number): void {
    let earliest = Infinity
    for (const [key, entry] of this.#held) {
      if (entry.expiresAt <= now) this.#remove(key, entry)
      else if (entry.expiresAt < earliest) earliest = entry.expiresAt
    }
    this.#heldSweepAt = earliest === Infinity ? Infinity : Math.max(earliest, now + HELD_SWEEP_INTERVAL)
  }

  // `keep` is the key of the record that just grew: it is never evicted, even when it alone is
  // larger than maxBytes, because losing a response that was just sent would let a retry run the
  // handler again.
  #grow (size: number, now: number, keep?: string): void {
    this.#bytes += size
    if (this.#bytes <= this.maxBytes) return
    let evicted = 0
    let keptOnTheWay = false
    if (now >= this.#heldSweepAt) this.#sweepHeld(now)
    while (this.#bytes > this.maxBytes) {
      this.#evictionCursor ??= this.#records.entries()
      const next = this.#evictionCursor.next()
      if (next.done === true) {
        // All that is left is set aside or just stored: the next sweep starts over.
        this.#evictionCursor = undefined
        break
      }
      const [key, entry] = next.value
      if (expiresAtOf(entry) <= now) {
        this.#remove(key, entry)
      } else if (typeof entry !== 'string' && entry.state !== 'completed') {
        this.#hold(key, entry, now)
      } else if (key !== keep) {
        this.#remove(key, entry)
        evicted++
      } else {
        keptOnTheWay = true
      }
    }
    // The record just kept is the oldest left: the next sweep starts over, and with it.
    if (keptOnTheWay) this.#evictionCursor = undefined
    this.#evictedSinceWarning += evicted
    if (this.#logger !== undefined && this.#evictedSinceWarning > 0 && now - this.#lastWarningAt >= EVICTION_WARNING_INTERVAL) {
      this.#logger.warn(
        { evicted: this.#evictedSinceWarning, maxBytes: this.maxBytes },
        'idempotency memory store is full: evicted the oldest finished records'
      )
      this.#lastWarningAt = now
      this.#evictedSinceWarning = 0
    }
  }
}

function toRecord (entry: Entry, leaseExpired: boolean): IdempotencyRecord {
  return {
    state: entry.state,
    fingerprint: entry.fingerprint,
    expiresAt: entry.expiresAt,
    leaseExpired,
    response: entry.state === 'completed'
      ? { statusCode: entry.statusCode, headers: entry.headers as StoredResponse['headers'], body: entry.body as StoredResponse['body'] }
      : undefined
  }
}

// A small Buffer is usually a view into Node's shared pool, or a slice of a larger one: kept as it
// is, it would keep all of that memory alive for as long as the record lives, far beyond what
// maxBytes counts. Such a body is copied into memory of its own.
function ownBytes (body: Buffer | string): Buffer | string {
  if (typeof body === 'string' || body.byteLength === body.buffer.byteLength) return body
  const own = Buffer.allocUnsafeSlow(body.byteLength)
  body.copy(own)
  return own
}

// A string body is counted by its length: V8 keeps most strings at one byte per character.
function responseSize (response: StoredResponse): number {
  let size = response.body.length
  for (const name in response.headers) {
    size += name.length + String(response.headers[name]).length
  }
  return size
}

// A completed record with a text body, the common case, is kept as one string: its numbers,
// then its fingerprint and its body. A record of objects (an entry, its numbers boxed, its
// strings) is five objects for the garbage collector to copy and mark for as long as the
// record lives; this is one, besides its key. The fields eviction reads come first.
function packCompleted (expiresAt: number, size: number, headersId: number, statusCode: number, fingerprint: string, body: string): string {
  // Joined rather than concatenated: a join makes one flat string, where `+` would keep a tree of
  // its parts alive.
  return [expiresAt, size, headersId, statusCode, fingerprint.length, fingerprint + body].join(' ')
}

function expiresAtOf (slot: Slot): number {
  return typeof slot === 'string' ? packedExpiresAt(slot) : slot.expiresAt
}

// Read digit by digit, since prune reads it for every record: a third of the time of slicing it
// out and converting that. Anything but a plain integer of up to 15 digits (always exact) goes
// through parseFloat, which reads a number up to the space that ends it.
function packedExpiresAt (packed: string): number {
  let value = 0
  let at = 0
  for (let code = packed.charCodeAt(0); code >= ZERO && code <= NINE; code = packed.charCodeAt(++at)) value = value * 10 + code - ZERO
  return at > 0 && at <= 15 && packed.charCodeAt(at) === SPACE ? value : parseFloat(packed)
}

/** The store's own non-negative integer that starts at `from`. */
function packedInteger (packed: string, from: number): number {
  let value = 0
  for (let code = packed.charCodeAt(from); code >= ZERO && code <= NINE; code = packed.charCodeAt(++from)) value = value * 10 + code - ZERO
  return value
}

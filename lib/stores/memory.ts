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
  // A completed record's response, kept in the entry itself: a record is as few objects as can
  // be, since every object kept is work for the garbage collector for as long as it lives.
  statusCode: number
  headers: StoredResponse['headers'] | undefined
  body: StoredResponse['body'] | undefined
  size: number
}

const validateOptions = compileOptions(MemoryStoreOptionsSchema, { subject: 'MemoryStore', prefix: '' })
const ENTRY_OVERHEAD = 160
const INSERTED: InsertResult = Object.freeze({ inserted: true })
const EVICTION_WARNING_INTERVAL = 60_000
// Records set aside by eviction are looked over for expired ones at most this often.
const HELD_SWEEP_INTERVAL = 1000
// Records prune() looks at in one turn of the event loop: about 0.1 to 1 ms.
const PRUNE_CHUNK = 5000

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
  #records = new Map<string, Entry>()
  // Running and halted records that eviction met: kept out of its way, so that no sweep steps
  // over them again (a store full of halted records would otherwise cost a whole sweep per
  // insert). A record leaves when it completes (to the back of #records), expires or goes.
  #held = new Map<string, Entry>()
  // When #held may hold an expired record: its earliest expiry, but at most once a
  // HELD_SWEEP_INTERVAL, since a sweep of #held costs one step per record in it.
  #heldSweepAt = Infinity
  // Where eviction goes on from. A Map marks deleted entries and compacts only now and then: a
  // new iterator for every eviction would step over all the entries evicted since, on every insert.
  #evictionCursor: MapIterator<[string, Entry]> | undefined
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
      if (existing.expiresAt > now) {
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
    if (entry === undefined || entry.expiresAt <= now) return undefined
    return toRecord(entry, entry.state === 'processing' && entry.leaseExpiresAt <= now)
  }

  update (key: string, owner: string, update: RecordUpdate): boolean {
    const now = this.#now()
    const entry = this.#find(key)
    if (entry === undefined || entry.owner !== owner || entry.state !== 'processing' || entry.expiresAt <= now) {
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
      const added = responseSize(update.response)
      entry.statusCode = update.response.statusCode
      entry.headers = update.response.headers
      entry.body = update.response.body
      entry.size += added
      // A request that ran long enough to renew its lease is the one whose client most likely
      // timed out and will retry: it moves to the back, as one set aside does. Others keep their place.
      if (entry.held || entry.renewed) {
        this.#mapOf(entry).delete(key)
        entry.held = false
        this.#records.set(key, entry)
      }
      this.#grow(added, now, entry)
    }
    return true
  }

  delete (key: string, owner: string): boolean {
    const entry = this.#find(key)
    if (entry === undefined || entry.owner !== owner || entry.state !== 'processing' || entry.expiresAt <= this.#now()) {
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
  #pruneChunk (records: MapIterator<[string, Entry]>, held: MapIterator<[string, Entry]>, removed: number): Awaitable<number> {
    const now = this.#now()
    for (let steps = 0; steps < PRUNE_CHUNK; steps++) {
      let next = records.next()
      if (next.done === true) next = held.next()
      if (next.done === true) return removed
      const [key, entry] = next.value
      if (entry.expiresAt <= now) {
        this.#remove(key, entry)
        removed++
      }
    }
    return new Promise<void>((resolve) => { setImmediate(resolve) })
      .then(() => this.#pruneChunk(records, held, removed))
  }

  // Most stores never set a record aside: a lookup then costs one Map lookup.
  #find (key: string): Entry | undefined {
    const entry = this.#records.get(key)
    return entry !== undefined || this.#held.size === 0 ? entry : this.#held.get(key)
  }

  #mapOf (entry: Entry): Map<string, Entry> {
    return entry.held ? this.#held : this.#records
  }

  #remove (key: string, entry: Entry): void {
    this.#mapOf(entry).delete(key)
    this.#bytes -= entry.size
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

  // `keep` is the record that just grew: it is never evicted, even when it alone is larger than
  // maxBytes, because losing a response that was just sent would let a retry run the handler again.
  #grow (size: number, now: number, keep?: Entry): void {
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
      if (entry.expiresAt <= now) {
        this.#remove(key, entry)
      } else if (entry.state !== 'completed') {
        this.#hold(key, entry, now)
      } else if (entry !== keep) {
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

// A string body is counted by its length: V8 keeps most strings at one byte per character.
function responseSize (response: StoredResponse): number {
  let size = response.body.length
  for (const name in response.headers) {
    size += name.length + String(response.headers[name]).length
  }
  return size
}

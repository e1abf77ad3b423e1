import Type from 'typebox'
import { compileOptions, withDefault } from '../options-validator.js'
import type {
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
  /** Eviction passed over this record (running, halted or just stored) on its current sweep. */
  passed: boolean
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

/**
 * Keeps records in this process: for one instance, tests and development. It answers at once,
 * without promises, so a tracked request costs no extra turn of the event loop.
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
  // Map order is the eviction order: a request's start, or its end for one that ran long.
  #records = new Map<string, Entry>()
  // Where eviction goes on from. A Map marks deleted entries and compacts only now and then: a
  // new iterator for every eviction would step over all the entries evicted since, on every insert.
  // A sweep starts over from the oldest record once one it passed over could go: it completed,
  // was halted or expired (#passedUntil is the earliest expiry among those it passed).
  #evictionCursor: MapIterator<[string, Entry]> | undefined
  #passedUntil = Infinity
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
    const existing = this.#records.get(key)
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
      passed: false,
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
    const entry = this.#records.get(key)
    if (entry === undefined || entry.expiresAt <= now) return undefined
    return toRecord(entry, entry.state === 'processing' && entry.leaseExpiresAt <= now)
  }

  update (key: string, owner: string, update: RecordUpdate): boolean {
    const now = this.#now()
    const entry = this.#records.get(key)
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
    if (entry.passed) {
      entry.passed = false
      this.#evictionCursor = undefined
    }
    if (update.state === 'completed') {
      const added = responseSize(update.response)
      entry.statusCode = update.response.statusCode
      entry.headers = update.response.headers
      entry.body = update.response.body
      entry.size += added
      // A request that ran long enough to renew its lease is the one whose client most likely
      // timed out and will retry: it moves to the back. Others keep their place.
      if (entry.renewed) {
        this.#records.delete(key)
        this.#records.set(key, entry)
      }
      this.#grow(added, now, entry)
    }
    return true
  }

  delete (key: string, owner: string): boolean {
    const entry = this.#records.get(key)
    if (entry === undefined || entry.owner !== owner || entry.state !== 'processing' || entry.expiresAt <= this.#now()) {
      return false
    }
    this.#remove(key, entry)
    return true
  }

  prune (): number {
    const now = this.#now()
    let removed = 0
    for (const [key, entry] of this.#records) {
      if (entry.expiresAt <= now) {
        this.#remove(key, entry)
        removed++
      }
    }
    return removed
  }

  #remove (key: string, entry: Entry): void {
    this.#records.delete(key)
    this.#bytes -= entry.size
  }

  // `keep` is the record that just grew: it is never evicted, even when it alone is larger than
  // maxBytes, because losing a response that was just sent would let a retry run the handler again.
  #grow (size: number, now: number, keep?: Entry): void {
    this.#bytes += size
    if (this.#bytes <= this.maxBytes) return
    let evicted = 0
    if (now >= this.#passedUntil) this.#evictionCursor = undefined
    while (this.#bytes > this.maxBytes) {
      if (this.#evictionCursor === undefined) {
        this.#evictionCursor = this.#records.entries()
        this.#passedUntil = Infinity
      }
      const next = this.#evictionCursor.next()
      if (next.done === true) {
        // All that is left is running, halted or just stored: the next sweep starts over.
        this.#evictionCursor = undefined
        break
      }
      const [key, entry] = next.value
      if (entry.expiresAt <= now) {
        this.#remove(key, entry)
      } else if (entry.state === 'completed' && entry !== keep) {
        this.#remove(key, entry)
        evicted++
      } else {
        // Running, halted, or the record being kept, which may go from the next sweep on.
        entry.passed = true
        const until = entry.state === 'completed' ? now : entry.expiresAt
        if (until < this.#passedUntil) this.#passedUntil = until
      }
    }
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

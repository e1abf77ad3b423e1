import { LRUCache } from 'lru-cache'
import Type from 'typebox'
import { compileOptions, withDefault } from '../options-validator.js'
import { Watchers } from './watchers.js'
import type { RequestIdentity } from '../key.js'
import type {
  IdempotencyRecord,
  IdempotencyStore,
  InsertResult,
  ListedRecord,
  ListPage,
  ListQuery,
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
  /** Bytes of completed records (bodies, headers, keys and bookkeeping) kept at most. Default 64 MiB. */
  maxBytes?: number
  /** The clock, in ms since the epoch. Default `Date.now`. */
  now?: () => number
  /** Told when completed records are evicted to stay under `maxBytes`. */
  logger?: WarningLogger
}

/** A running or halted record; or a completed one too large for the cache. */
interface Entry {
  state: RecordState
  fingerprint: string
  /** The owner's token while the record runs, else ''. */
  owner: string
  expiresAt: number
  leaseExpiresAt: number
  response: StoredResponse | undefined
  createdAt: number | undefined
  identity: RequestIdentity | undefined
  /** The order of creation, which `list` pages by. */
  sequence: number
}

const validateOptions = compileOptions(MemoryStoreOptionsSchema, { subject: 'MemoryStore', prefix: '' })
// What a record costs beyond its key, fingerprint, headers and body: the entry and the cache's slot.
const ENTRY_OVERHEAD = 160
const INSERTED: InsertResult = Object.freeze({ inserted: true })
const TOOK_OVER: InsertResult = Object.freeze({ inserted: true, tookOver: true })
const EVICTION_WARNING_INTERVAL = 60_000

/**
 * Keeps records in this process: for one instance, tests and development. Running and halted
 * records are kept in a `Map` and never evicted (forgetting a halted record would let a retry run
 * again); completed ones in a least-recently-used cache bounded by `maxBytes`, which evicts the
 * least recently used first and warns at most once a minute when it does. A completed record
 * larger than `maxBytes` on its own is kept with the running ones rather than lost. It answers
 * directly, without promises, so a tracked request costs no extra turn of the event loop.
 *
 * @example
 * await app.register(idempotency, { store: new MemoryStore({ maxBytes: 16 * 1024 * 1024 }) })
 */
export class MemoryStore implements IdempotencyStore {
  readonly name = 'memory'
  readonly inProcess = true
  readonly maxBytes: number
  #now: () => number
  #logger: WarningLogger | undefined
  #entries = new Map<string, Entry>()
  #created = 0
  // Completed records, kept as lookups answer them.
  #completed: LRUCache<string, IdempotencyRecord>
  // Who waits for a key's record to finish.
  #watchers = new Watchers()
  #evictedSinceWarning = 0
  #lastWarningAt = -Infinity

  constructor (options: MemoryStoreOptions = {}) {
    const settings = validateOptions(options)
    this.maxBytes = settings.maxBytes
    const now = settings.now ?? Date.now
    this.#now = now
    this.#logger = settings.logger
    this.#completed = new LRUCache<string, IdempotencyRecord>({
      maxSize: settings.maxBytes,
      sizeCalculation: (record, key) => size(key, record),
      // Expiry is judged here, by the store's clock, to the millisecond: the cache keeps no times.
      dispose: (record, _key, reason) => {
        if (reason === 'evict' && record.expiresAt > now()) this.#evictedSinceWarning++
      }
    })
  }

  /** Bytes of the completed records the cache holds, as it counts them. */
  get size (): number {
    return this.#completed.calculatedSize
  }

  insert (key: string, record: NewRecord): InsertResult {
    const now = this.#now()
    const completed = this.#completed.get(key)
    if (completed !== undefined && completed.expiresAt > now) return { inserted: false, record: completed }
    const existing = this.#entries.get(key)
    const live = existing !== undefined && existing.expiresAt > now
    if (live) {
      const takeOver = record.takeOverExpiredLease && existing.fingerprint === record.fingerprint && leaseLapsed(existing, now)
      if (!takeOver) return { inserted: false, record: toRecord(existing, now) }
    }
    this.#entries.set(key, {
      state: 'processing',
      fingerprint: record.fingerprint,
      owner: record.owner,
      expiresAt: record.expiresAt,
      leaseExpiresAt: now + record.lease,
      response: undefined,
      createdAt: record.createdAt,
      identity: record.identity,
      sequence: ++this.#created
    })
    return live ? TOOK_OVER : INSERTED
  }

  lookup (key: string): IdempotencyRecord | undefined {
    const now = this.#now()
    const completed = this.#completed.get(key)
    if (completed !== undefined && completed.expiresAt > now) return completed
    const entry = this.#entries.get(key)
    if (entry === undefined || entry.expiresAt <= now) return undefined
    const record = toRecord(entry, now)
    if (entry.state === 'processing') record.leaseExpiresAt = entry.leaseExpiresAt
    if (entry.state !== 'completed') {
      if (entry.createdAt !== undefined) record.createdAt = entry.createdAt
      if (entry.identity !== undefined) record.identity = entry.identity
    }
    return record
  }

  remove (key: string): boolean {
    const record = this.lookup(key)
    if (record === undefined || (record.state === 'processing' && !record.leaseExpired)) return false
    this.#completed.delete(key)
    this.#entries.delete(key)
    this.#watchers.tell(key)
    return true
  }

  /** Halted records and processing ones whose lease lapsed, in the order they were created; the cursor is where a page ended. */
  list (query: ListQuery): ListPage {
    const now = this.#now()
    const after = query.cursor === undefined ? 0 : Number(query.cursor)
    const found: Array<[string, Entry]> = []
    for (const [key, entry] of this.#entries) {
      if (entry.sequence > after && entry.expiresAt > now && listed(entry, query.state, now)) found.push([key, entry])
    }
    found.sort(([, a], [, b]) => a.sequence - b.sequence)
    const page = found.slice(0, query.limit)
    const records = page.map(([key, entry]): ListedRecord => ({
      key, state: entry.state as ListedRecord['state'], leaseExpired: leaseLapsed(entry, now), expiresAt: entry.expiresAt, createdAt: entry.createdAt, identity: entry.identity
    }))
    const last = page[page.length - 1]
    return { records, cursor: found.length > query.limit && last !== undefined ? String(last[1].sequence) : undefined }
  }

  update (key: string, owner: string, update: RecordUpdate): boolean {
    const now = this.#now()
    const entry = this.#owned(key, owner, now)
    if (entry === undefined) return false
    if (update.state === 'processing') {
      entry.leaseExpiresAt = now + update.lease
      entry.expiresAt = Math.max(entry.expiresAt, entry.leaseExpiresAt)
      return true
    }
    entry.state = update.state
    entry.expiresAt = update.expiresAt
    entry.owner = ''
    this.#watchers.tell(key)
    if (update.state === 'halted') {
      entry.leaseExpiresAt = 0
      return true
    }
    const body = ownBytes(update.response.body)
    const response = body === update.response.body ? update.response : { ...update.response, body }
    const completed: IdempotencyRecord = { state: 'completed', fingerprint: entry.fingerprint, expiresAt: update.expiresAt, leaseExpired: false, response }
    if (update.expiresAt > now && size(key, completed) <= this.maxBytes) {
      this.#entries.delete(key)
      this.#completed.set(key, completed)
      this.#warnOfEvictions(now)
    } else {
      entry.leaseExpiresAt = 0
      entry.response = response
      entry.identity = undefined
      entry.createdAt = undefined
    }
    return true
  }

  delete (key: string, owner: string): boolean {
    if (this.#owned(key, owner, this.#now()) === undefined) return false
    this.#entries.delete(key)
    this.#watchers.tell(key)
    return true
  }

  /** Tells `listener`, in this process and at once, when the record under `key` is completed, halted or deleted. */
  watch (key: string, listener: () => void): () => void {
    return this.#watchers.add(key, listener)
  }

  /** Removes expired records; answers how many it removed. */
  prune (): number {
    const now = this.#now()
    let removed = 0
    for (const [key, entry] of this.#entries) {
      if (entry.expiresAt <= now) {
        this.#entries.delete(key)
        removed++
      }
    }
    const expired: string[] = []
    this.#completed.forEach((entry, key) => {
      if (entry.expiresAt <= now) expired.push(key)
    })
    for (const key of expired) this.#completed.delete(key)
    return removed + expired.length
  }

  #owned (key: string, owner: string, now: number): Entry | undefined {
    const entry = this.#entries.get(key)
    return entry !== undefined && entry.owner === owner && entry.state === 'processing' && entry.expiresAt > now ? entry : undefined
  }

  #warnOfEvictions (now: number): void {
    if (this.#evictedSinceWarning === 0 || this.#logger === undefined || now - this.#lastWarningAt < EVICTION_WARNING_INTERVAL) return
    this.#logger.warn(
      { evicted: this.#evictedSinceWarning, maxBytes: this.maxBytes },
      'idempotency memory store is full: evicted the least recently used completed records'
    )
    this.#lastWarningAt = now
    this.#evictedSinceWarning = 0
  }
}

function listed (entry: Entry, state: ListQuery['state'], now: number): boolean {
  if (entry.state === 'halted') return state !== 'lapsed'
  return state !== 'halted' && leaseLapsed(entry, now)
}

function leaseLapsed (entry: Entry, now: number): boolean {
  return entry.state === 'processing' && entry.leaseExpiresAt <= now
}

function toRecord (entry: Entry, now: number): IdempotencyRecord {
  return {
    state: entry.state,
    fingerprint: entry.fingerprint,
    expiresAt: entry.expiresAt,
    leaseExpired: leaseLapsed(entry, now),
    response: entry.response
  }
}

function size (key: string, record: IdempotencyRecord): number {
  const response = record.response as StoredResponse
  let bytes = ENTRY_OVERHEAD + key.length + record.fingerprint.length + Buffer.byteLength(response.body)
  for (const name in response.headers) bytes += name.length + String(response.headers[name]).length
  return bytes
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

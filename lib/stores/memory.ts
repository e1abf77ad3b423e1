import Type from 'typebox'
import { compileOptions, withDefault } from '../options-validator.js'
import { RecordRing, textBytes, type RingCursor } from './record-ring.js'
import type {
  Awaitable,
  IdempotencyRecord,
  IdempotencyStore,
  InsertResult,
  LeaseHolder,
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

/**
 * A record kept as an object: a running or halted one, or a completed one too large for the
 * ring. Completed records otherwise live in the ring, outside V8's heap.
 */
interface Entry {
  state: RecordState
  fingerprint: string
  owner: string
  expiresAt: number
  leaseExpiresAt: number
  /** The tracker's hold on the lease while the record runs, and the lease's length (ms). */
  holder: HeldLeases | undefined
  lease: number
  /** The key's hash in the ring, for when the record completes. */
  hash: number
  /** Completion order (completed only). */
  sequence: number
  statusCode: number
  headers: StoredResponse['headers'] | undefined
  body: StoredResponse['body'] | undefined
  size: number
}

type Headers = StoredResponse['headers']

interface HeaderSet {
  id: number
  headers: Headers
  /** Bytes of its names and values. */
  bytes: number
  /** Ring records that refer to it. */
  uses: number
}

const validateOptions = compileOptions(MemoryStoreOptionsSchema, { subject: 'MemoryStore', prefix: '' })
const ENTRY_OVERHEAD = 160
const INSERTED: InsertResult = Object.freeze({ inserted: true })
const EVICTION_WARNING_INTERVAL = 60_000
// Running and halted records are looked over for expired ones at most this often, and only when
// the store is full.
const SWEEP_INTERVAL = 1000
// Records prune() looks at in one turn of the event loop: about 0.1 to 1 ms.
const PRUNE_CHUNK = 5000

/**
 * Keeps records in this process: for one instance, tests and development. It answers at once,
 * without promises, so a tracked request costs no extra turn of the event loop (only `prune` of a
 * large store answers through a promise, walking it a chunk per turn).
 *
 * Completed records are kept outside V8's heap, in a ring (see `RecordRing`): the garbage
 * collector's work does not grow with the store. Bounded by `maxBytes`: when full it evicts the
 * oldest completed records, never in-flight or halted ones (a halted record stands for an outcome
 * nobody knows; forgetting it would let a retry run again). A running record keeps its lease for
 * as long as the tracker that created it holds it (`leaseHolder`), so no renewals are sent to it.
 *
 * @example
 * await app.register(idempotency, { store: new MemoryStore({ maxBytes: 16 * 1024 * 1024 }) })
 */
export class MemoryStore implements IdempotencyStore {
  readonly inProcess = true
  readonly maxBytes: number
  #now: () => number
  #logger: WarningLogger | undefined
  #ring: RecordRing
  // Running and halted records: few, and short-lived but for halted ones.
  #entries = new Map<string, Entry>()
  // Completed records too large for the ring, in the order they completed.
  #large = new Map<string, Entry>()
  // Where eviction of large records goes on from. A Map marks deleted entries and compacts only
  // now and then: a new iterator for every eviction would step over all those evicted since.
  #largeCursor: MapIterator<[string, Entry]> | undefined
  // The oldest large record, which the cursor has passed.
  #largeOldest: [string, Entry] | undefined
  #sequence = 0
  // When #entries may hold an expired record: its earliest expiry, but at most once a
  // SWEEP_INTERVAL, since a sweep costs one step per record in it.
  #sweepAt = Infinity
  #sweptAt = -Infinity
  // The header sets of ring records, by number. The plugin hands a route's records one frozen
  // object for as long as their headers stay the same (the Expires header changes each second).
  // A set is forgotten when its last record goes.
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
    // The ring drops its oldest records when it has no room left for a new one. Every record
    // counts at least ENTRY_OVERHEAD bytes: no more than that many fit in maxBytes.
    this.#ring = new RecordRing(settings.maxBytes, Math.floor(settings.maxBytes / ENTRY_OVERHEAD) + 1, (at) => {
      if (this.#ring.expiresAt(at) > this.#now()) this.#evictedSinceWarning++
      this.#forget(at)
    })
  }

  /** A tracker's hold on the leases of the records it creates (see `IdempotencyStore.leaseHolder`). */
  leaseHolder (): LeaseHolder {
    // A release is a renewal on the record's own lease, which ends the hold on it.
    return new HeldLeases(this, this.#now, (key, owner, holder) => {
      const entry = this.#entries.get(key)
      if (entry?.holder === holder) this.update(key, owner, { state: 'processing', lease: entry.lease })
    })
  }

  /** Bytes currently accounted to stored records. */
  get size (): number {
    return this.#bytes
  }

  insert (key: string, record: NewRecord): InsertResult {
    const now = this.#now()
    const ring = this.#ring
    const hash = ring.hash(key)
    const at = ring.find(key, hash)
    if (at >= 0) {
      if (ring.expiresAt(at) > now) return { inserted: false, record: this.#unpack(at, record.fingerprint) }
      this.#removeFromRing(at)
    } else {
      const existing = this.#findEntry(key)
      if (existing !== undefined) {
        if (liveUntil(existing, now) > now) {
          const leaseExpired = leaseLapsed(existing, now)
          const takeOver = leaseExpired && record.takeOverExpiredLease && existing.fingerprint === record.fingerprint
          if (!takeOver) return { inserted: false, record: toRecord(existing, now) }
        }
        this.#removeEntry(key, existing)
      }
    }
    const size = ENTRY_OVERHEAD + key.length + record.fingerprint.length + record.owner.length
    this.#entries.set(key, {
      state: 'processing',
      fingerprint: record.fingerprint,
      owner: record.owner,
      expiresAt: record.expiresAt,
      leaseExpiresAt: now + record.lease,
      holder: record.holder instanceof HeldLeases && record.holder.store === this ? record.holder : undefined,
      lease: record.lease,
      hash,
      sequence: 0,
      statusCode: 0,
      headers: undefined,
      body: undefined,
      size
    })
    this.#sweepBy(record.expiresAt)
    this.#grow(size, now, -1)
    return INSERTED
  }

  lookup (key: string): IdempotencyRecord | undefined {
    const now = this.#now()
    const ring = this.#ring
    const at = ring.find(key, ring.hash(key))
    if (at >= 0) return ring.expiresAt(at) > now ? this.#unpack(at) : undefined
    const entry = this.#findEntry(key)
    if (entry === undefined || liveUntil(entry, now) <= now) return undefined
    return toRecord(entry, now)
  }

  update (key: string, owner: string, update: RecordUpdate): boolean {
    const now = this.#now()
    const entry = this.#entries.get(key)
    if (entry === undefined || entry.owner !== owner || entry.state !== 'processing' || liveUntil(entry, now) <= now) {
      return false
    }
    if (update.state === 'processing') {
      entry.holder = undefined
      entry.leaseExpiresAt = now + update.lease
      entry.expiresAt = Math.max(entry.expiresAt, entry.leaseExpiresAt)
      return true
    }
    entry.state = update.state
    entry.expiresAt = update.expiresAt
    entry.owner = ''
    if (update.state === 'halted') {
      this.#sweepBy(update.expiresAt)
      return true
    }
    this.#entries.delete(key)
    const response = update.response
    const sequence = ++this.#sequence
    const headers = this.#useHeaders(response.headers)
    const body = response.body
    const bodyBytes = typeof body === 'string' ? textBytes(body) : body.byteLength
    const added = headers.bytes + bodyBytes
    entry.size += added
    const evicted = this.#evictedSinceWarning
    const at = this.#ring.add(key, entry.hash, {
      expiresAt: update.expiresAt,
      sequence,
      size: entry.size,
      headersId: headers.id,
      statusCode: response.statusCode,
      fingerprint: entry.fingerprint,
      body,
      bodyBytes
    })
    if (at < 0) {
      this.#releaseHeaders(headers.id)
      entry.sequence = sequence
      entry.statusCode = response.statusCode
      entry.headers = response.headers
      entry.body = ownBytes(body)
      this.#large.set(key, entry)
    }
    this.#grow(added, now, sequence, this.#evictedSinceWarning !== evicted)
    return true
  }

  delete (key: string, owner: string): boolean {
    const now = this.#now()
    const entry = this.#entries.get(key)
    if (entry === undefined || entry.owner !== owner || entry.state !== 'processing' || liveUntil(entry, now) <= now) {
      return false
    }
    this.#removeEntry(key, entry)
    return true
  }

  /**
   * Removes expired records. A store of up to PRUNE_CHUNK records is pruned at once; a larger one
   * in chunks, one per turn of the event loop, so that requests go on meanwhile (answers through
   * a promise then).
   */
  prune (): Awaitable<number> {
    return this.#pruneChunk(this.#ring.cursor(), this.#entries.entries(), this.#large.entries(), 0)
  }

  // The walks are live: records added meanwhile are visited too. #sweepAt is left as it is: at
  // worst early, which costs one sweep that finds less to remove.
  #pruneChunk (ring: RingCursor, entries: MapIterator<[string, Entry]>, large: MapIterator<[string, Entry]>, removed: number): Awaitable<number> {
    const now = this.#now()
    for (let steps = 0; steps < PRUNE_CHUNK; steps++) {
      const at = this.#ring.next(ring)
      if (at >= 0) {
        if (this.#ring.expiresAt(at) <= now) {
          this.#removeFromRing(at)
          removed++
        }
        continue
      }
      let next = entries.next()
      if (next.done === true) next = large.next()
      if (next.done === true) {
        // A cursor left over from before the Map resized would keep its old table, and with it
        // records removed since, alive: the next eviction starts afresh from a compacted Map.
        this.#largeCursor = undefined
        this.#largeOldest = undefined
        return removed
      }
      const [key, entry] = next.value
      if (liveUntil(entry, now) <= now) {
        this.#removeEntry(key, entry)
        removed++
      }
    }
    return new Promise<void>((resolve) => { setImmediate(resolve) })
      .then(() => this.#pruneChunk(ring, entries, large, removed))
  }

  // Most stores never keep a record too large for the ring: a lookup then costs one Map lookup.
  #findEntry (key: string): Entry | undefined {
    const entry = this.#entries.get(key)
    return entry !== undefined || this.#large.size === 0 ? entry : this.#large.get(key)
  }

  #removeEntry (key: string, entry: Entry): void {
    if (entry.state === 'completed') {
      this.#large.delete(key)
      if (this.#largeOldest?.[1] === entry) this.#largeOldest = undefined
    } else {
      this.#entries.delete(key)
    }
    this.#bytes -= entry.size
  }

  #removeFromRing (at: number): void {
    this.#forget(at)
    this.#ring.remove(at)
  }

  // What a ring record holds outside the ring: its bytes' account and its header set.
  #forget (at: number): void {
    this.#bytes -= this.#ring.size(at)
    this.#releaseHeaders(this.#ring.headersId(at))
  }

  #useHeaders (headers: Headers): HeaderSet {
    let set = this.#headerSets.get(headers)
    if (set === undefined) {
      set = { id: this.#freeHeaderIds.pop() ?? this.#headerSetsById.length, headers, bytes: headerBytes(headers), uses: 0 }
      this.#headerSetsById[set.id] = set
      this.#headerSets.set(headers, set)
    }
    set.uses++
    return set
  }

  #releaseHeaders (id: number): void {
    const set = this.#headerSetsById[id] as HeaderSet
    if (--set.uses > 0) return
    this.#headerSets.delete(set.headers)
    this.#headerSetsById[id] = undefined
    this.#freeHeaderIds.push(id)
  }

  // A replay's fingerprint is the request's own string when the record's is equal to it.
  #unpack (at: number, fingerprint?: string): IdempotencyRecord {
    const ring = this.#ring
    return {
      state: 'completed',
      fingerprint: fingerprint !== undefined && ring.hasFingerprint(at, fingerprint) ? fingerprint : ring.fingerprint(at),
      expiresAt: ring.expiresAt(at),
      leaseExpired: false,
      response: {
        statusCode: ring.statusCode(at),
        headers: (this.#headerSetsById[ring.headersId(at)] as HeaderSet).headers,
        body: ring.body(at)
      }
    }
  }

  #sweepBy (expiresAt: number): void {
    if (expiresAt < this.#sweepAt) this.#sweepAt = Math.max(expiresAt, this.#sweptAt + SWEEP_INTERVAL)
  }

  #sweep (now: number): void {
    let earliest = Infinity
    for (const [key, entry] of this.#entries) {
      const until = liveUntil(entry, now)
      if (until <= now) this.#removeEntry(key, entry)
      else if (until < earliest) earliest = until
    }
    this.#sweptAt = now
    this.#sweepAt = earliest === Infinity ? Infinity : Math.max(earliest, now + SWEEP_INTERVAL)
  }

  // `keep` is the completion sequence of the record just stored: it is never evicted, even when it
  // alone is larger than maxBytes, because losing a response that was just sent would let a
  // retry run the handler again. `dropped`: the ring dropped records to make room for it.
  #grow (size: number, now: number, keep: number, dropped = false): void {
    this.#bytes += size
    if (this.#bytes > this.maxBytes) {
      if (now >= this.#sweepAt) this.#sweep(now)
      while (this.#bytes > this.maxBytes && this.#evictOldest(now, keep));
    } else if (!dropped) {
      return
    }
    if (this.#logger !== undefined && this.#evictedSinceWarning > 0 && now - this.#lastWarningAt >= EVICTION_WARNING_INTERVAL) {
      this.#logger.warn(
        { evicted: this.#evictedSinceWarning, maxBytes: this.maxBytes },
        'idempotency memory store is full: evicted the oldest finished records'
      )
      this.#lastWarningAt = now
      this.#evictedSinceWarning = 0
    }
  }

  // Removes the oldest completed record, of the ring's and the large ones; answers false when
  // there is none but `keep`. An expired one is removed without counting as an eviction.
  #evictOldest (now: number, keep: number): boolean {
    const ring = this.#ring
    const at = ring.oldest()
    const large = this.#oldestLarge()
    if (at >= 0 && (large === undefined || ring.sequence(at) < large[1].sequence)) {
      if (ring.sequence(at) === keep) return false
      if (ring.expiresAt(at) > now) this.#evictedSinceWarning++
      this.#removeFromRing(at)
      return true
    }
    if (large === undefined || large[1].sequence === keep) return false
    if (large[1].expiresAt > now) this.#evictedSinceWarning++
    this.#removeEntry(large[0], large[1])
    return true
  }

  #oldestLarge (): [string, Entry] | undefined {
    if (this.#large.size === 0) return undefined
    if (this.#largeOldest === undefined) {
      // Never at its end: every record it passed was evicted before it went on, and those added
      // since are after it.
      this.#largeCursor ??= this.#large.entries()
      this.#largeOldest = this.#largeCursor.next().value as [string, Entry]
    }
    return this.#largeOldest
  }
}

// A tracker's hold on the leases of its running records: while it lasts, a lease is as if renewed
// at every look.
class HeldLeases implements LeaseHolder {
  /** When the tracker closed, by the store's clock; Infinity while it is open. */
  closedAt = Infinity
  /** The store whose records it holds: a hold from any other is none. */
  readonly store: MemoryStore
  readonly #now: () => number
  readonly #release: (key: string, owner: string, holder: HeldLeases) => void

  constructor (store: MemoryStore, now: () => number, release: (key: string, owner: string, holder: HeldLeases) => void) {
    this.store = store
    this.#now = now
    this.#release = release
  }

  close (): void {
    if (this.closedAt === Infinity) this.closedAt = this.#now()
  }

  release (key: string, owner: string): void {
    this.#release(key, owner, this)
  }
}

// A running record whose tracker is open holds its lease as if renewed at every look, until the
// tracker closed.
function heldUntil (holder: HeldLeases, lease: number, now: number): number {
  return Math.min(holder.closedAt, now) + lease
}

function liveUntil (entry: Entry, now: number): number {
  if (entry.holder === undefined || entry.state !== 'processing') return entry.expiresAt
  return Math.max(entry.expiresAt, heldUntil(entry.holder, entry.lease, now))
}

function leaseLapsed (entry: Entry, now: number): boolean {
  if (entry.state !== 'processing') return false
  const end = entry.holder === undefined ? entry.leaseExpiresAt : Math.max(entry.leaseExpiresAt, heldUntil(entry.holder, entry.lease, now))
  return end <= now
}

function toRecord (entry: Entry, now: number): IdempotencyRecord {
  return {
    state: entry.state,
    fingerprint: entry.fingerprint,
    expiresAt: liveUntil(entry, now),
    leaseExpired: leaseLapsed(entry, now),
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

function headerBytes (headers: Headers): number {
  let bytes = 0
  for (const name in headers) bytes += name.length + String(headers[name]).length
  return bytes
}

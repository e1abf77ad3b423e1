import Type from 'typebox'
import { compileOptions, withDefault } from '../options-validator.js'
import { identityJson, parseIdentityJson } from '../key.js'
import { withTimeout } from './timeout.js'
import { InvalidOptionError } from '../errors.js'
import { Watchers } from './watchers.js'
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

/**
 * What the store needs of an ioredis client: a single `Redis` or a `Cluster` (e.g. `app.redis`
 * of @fastify/redis) fits. Described by its shape so that the types do not depend on ioredis
 * being installed.
 */
export interface RedisClient {
  defineCommand (name: string, definition: { lua: string, numberOfKeys?: number }): void
  readonly status: string
  /** `true` for an ioredis `Cluster`. */
  readonly isCluster?: boolean
  /** Told when the client is ready again after reconnecting. */
  once? (event: 'ready', listener: () => void): unknown
  /** `replicas` only: WAIT, and the connection's close, after which a WAIT counts nothing. */
  wait? (replicas: number, timeout: number): Promise<number>
  on? (event: 'close', listener: () => void): unknown
  /** `list` only: SCAN, on a single Redis. */
  scan? (cursor: string, match: 'MATCH', pattern: string, count: 'COUNT', keys: number): Promise<[cursor: string, keys: string[]]>
  /** `list` only: a Cluster's master nodes, each scanned in turn. */
  nodes? (role: 'master'): Scanner[]
  /** ioredis's options: a `keyPrefix` there is put before every key, but not in SCAN. */
  readonly options?: { keyPrefix?: string | undefined }
  /**
   * A connection of its own for `watch`'s subscriptions; without it, waiters look on their own. A
   * Cluster's is asked for sharded subscribers, one per master.
   */
  // A Redis takes (options), a Cluster (startupNodes, options): both fit.
  duplicate? (...arguments_: any[]): Subscriber
}

/** What `watch` needs of the connection `duplicate()` gives: channels, or a Cluster's sharded channels. */
interface Subscriber {
  subscribe (...channels: string[]): Promise<unknown>
  unsubscribe (channel: string): Promise<unknown>
  ssubscribe (channel: string): Promise<unknown>
  sunsubscribe (channel: string): Promise<unknown>
  on (event: 'message' | 'smessage', listener: (channel: string) => void): unknown
  on (event: 'ready' | 'subscribersReady' | 'error', listener: () => void): unknown
  disconnect (): void
}

interface Scanner { scan: NonNullable<RedisClient['scan']> }

const RedisStoreOptionsSchema = Type.Object({
  client: Type.Unsafe<RedisClient>(Type.Object({ defineCommand: Type.Function([], Type.Any()) }, {
    description: 'an ioredis client (Redis or Cluster)'
  })),
  prefix: Type.Optional(withDefault(Type.String(), 'idem:')),
  timeout: Type.Optional(withDefault(Type.Integer({ minimum: 1 }), 1000)),
  replicas: Type.Optional(withDefault(Type.Integer({ minimum: 0 }), 0))
}, { additionalProperties: false })

export interface RedisStoreOptions {
  /** The client; the store defines its scripts on it and never closes it. */
  client: RedisClient
  /** Put before every key. Default `idem:`. */
  prefix?: string
  /** ms a call may take before it fails (and the request gets 503). Default 1000. */
  timeout?: number
  /**
   * Replicas that must have a claimed key and a completed response (`WAIT`, within `timeout`)
   * before the handler runs or the response counts as saved. Default 0: Redis's asynchronous
   * replication alone. Not on a Cluster.
   */
  replicas?: number
}

// A record is one Redis string, the fields every state has first and the state's own after:
//   <state>\n<expiresAt>\n<fingerprint length>\n<fingerprint>, then
//   p (processing): <lease end>\n<owner>\n<origin>
//   c (completed):  <status>\n<headers as JSON>\n<body bytes>
//   h (halted):     <origin>
// where <origin> is the JSON of when the record was created and the request that created it, for
// operators (empty when the tracker gave none); a completed record does not keep it.
// Times are ms since the epoch; the fingerprint's length is in bytes, so that it may hold any
// character, and JSON never holds a raw newline. A string costs Redis one command to read and one
// to write with its expiry. Leases are judged by Redis's own clock, so that app servers whose
// clocks differ never disagree about them: a lease end is a time (TIME), or ~<ms>, that many ms
// before the key expires (PTTL). A claim writes the record the app built, ~<ms> included, with an
// expiry in ms (PX) that Redis counts from its own clock: claiming a key reads no time, which
// costs a command per fresh key. A processing record whose lease lapsed is answered with its first
// letter changed to l, and its lease end as a time.
// A processing record that a duplicate waits for is marked P (and answered L once lapsed): its
// completion, halt or deletion is published on a channel named by its key, in the same step; an
// unmarked record's end publishes nothing.
//
// Every operation is one step of one script: KEYS[i] is step i's key, and ARGV holds each
// step's kind followed by its arguments. The steps of one turn of the event loop go to Redis as
// one call, so that requests arriving together cost one command and one round trip; each step
// still reads and writes only its own key, atomically. On a Cluster, where one call may only
// touch one slot, every step is a call of its own.
const STEPS = `local find, sub, byte = string.find, string.sub, string.byte
local out = {}
local a = 1
-- Redis's time, read once per call, by the steps that need it.
local now
local function clock ()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now
end
-- Where the expiry, the fingerprint and the fingerprint's length end.
local function fields (r)
  local expiresEnd = find(r, '\\n', 3, true)
  local lengthEnd = find(r, '\\n', expiresEnd + 1, true)
  return expiresEnd, lengthEnd + tonumber(sub(r, expiresEnd + 1, lengthEnd - 1)), lengthEnd
end
local function running (b) return b == 112 or b == 80 end
local function answer (key, r)
  local b = byte(r, 1)
  if not running(b) then return r end
  local _, fingerprintEnd = fields(r)
  local leaseEnd = find(r, '\\n', fingerprintEnd + 1, true)
  local lease
  if byte(r, fingerprintEnd + 1) == 126 then
    lease = clock() + redis.call('PTTL', key) - tonumber(sub(r, fingerprintEnd + 2, leaseEnd - 1))
    r = sub(r, 1, fingerprintEnd) .. lease .. sub(r, leaseEnd)
  else
    lease = tonumber(sub(r, fingerprintEnd + 1, leaseEnd - 1))
  end
  if lease > clock() then return r end
  return (b == 80 and 'L' or 'l') .. sub(r, 2)
end
-- The end of a record that a duplicate waits for is told on the channel named by its key: on a
-- Cluster, a sharded channel (SPUBLISH, Redis 7), which stays on the key's shard.
local function told (key, r)
  if byte(r, 1) == 80 then redis.call(PUBLISH, key, '') end
end
local function step (key, kind, a)
  if kind == 'x' then
    local r = redis.call('GET', key)
    -- A running record whose lease is live is left: its owner still runs.
    if not r or running(byte(answer(key, r), 1)) then return 0 end
    redis.call('DEL', key)
    told(key, r)
    return 1
  end
  if kind == 'w' then
    local r = redis.call('GET', key)
    if r and byte(r, 1) == 112 then redis.call('SET', key, 'P' .. sub(r, 2), 'KEEPTTL') end
    return 1
  end
  if kind == 'i' then
    -- ARGV: the record to write, px, and 1 to take over a lapsed lease.
    local r = redis.call('GET', key)
    if not r then
      redis.call('SET', key, ARGV[a + 1], 'PX', ARGV[a + 2])
      return 1
    end
    r = answer(key, r)
    local b = byte(r, 1)
    if ARGV[a + 3] ~= '1' or not (b == 108 or b == 76) then return r end
    local claimed = ARGV[a + 1]
    local _, fingerprintEnd, lengthEnd = fields(r)
    local _, claimedEnd, claimedLengthEnd = fields(claimed)
    if sub(r, lengthEnd + 1, fingerprintEnd) ~= sub(claimed, claimedLengthEnd + 1, claimedEnd) then return r end
    -- Who waited for the lapsed record waits for the one taking it over.
    redis.call('SET', key, (b == 76 and 'P' or 'p') .. sub(claimed, 2), 'PX', ARGV[a + 2])
    return 2
  end
  local r = redis.call('GET', key)
  if kind == 'l' then return r and answer(key, r) or 0 end
  if not r or not running(byte(r, 1)) then return 0 end
  local expiresEnd, fingerprintEnd = fields(r)
  local leaseEnd = find(r, '\\n', fingerprintEnd + 1, true)
  local ownerEnd = find(r, '\\n', leaseEnd + 1, true)
  if sub(r, leaseEnd + 1, (ownerEnd or #r + 1) - 1) ~= ARGV[a + 1] then return 0 end
  if kind == 'd' then
    redis.call('DEL', key)
  elseif kind == 'r' then
    local lease = clock() + tonumber(ARGV[a + 2])
    local expiresAt = math.max(tonumber(sub(r, 3, expiresEnd - 1)), lease)
    redis.call('SET', key, sub(r, 1, 2) .. expiresAt .. sub(r, expiresEnd, fingerprintEnd) .. lease .. sub(r, leaseEnd), 'PXAT', expiresAt)
    return 1
  elseif kind == 'h' then
    redis.call('SET', key, 'h\\n' .. ARGV[a + 2] .. sub(r, expiresEnd, fingerprintEnd) .. (ownerEnd and sub(r, ownerEnd + 1) or ''), 'PXAT', ARGV[a + 2])
  else
    redis.call('SET', key, 'c\\n' .. ARGV[a + 2] .. sub(r, expiresEnd, fingerprintEnd) .. ARGV[a + 3] .. ARGV[a + 4], 'PXAT', ARGV[a + 2])
  end
  told(key, r)
  return 1
end
-- How many ARGV each kind of step takes, its kind included.
local sizes = {i = 4, l = 1, d = 2, r = 3, h = 3, c = 5, x = 1, w = 1}
-- A step that fails (a key of another type, a value this store did not write) fails alone.
for i = 1, #KEYS do
  local kind = ARGV[a]
  local ok, reply = pcall(step, KEYS[i], kind, a)
  if ok then
    out[i] = reply
  else
    local message = type(reply) == 'table' and reply.err or tostring(reply)
    -- Redis's own errors start with their code (WRONGTYPE); the script's own, on a value it cannot read, do not.
    if not find(message, '^%u+ ') then message = 'ERR not a record of this store: ' .. message end
    out[i] = {err = message}
  end
  a = a + sizes[kind]
end
return out`

/** A step answers 1 (done), 0 (no record, or not the owner's) or a record's bytes. */
type StepReply = Buffer | number
type StepArgument = string | number | Buffer

/** An insert whose outcome is unknown: its record is deleted if its owner still holds it. */
interface Undo {
  key: string
  owner: string
  /** When the record would expire anyway. */
  expiresAt: number
  /** Calls that carried this delete and did not come back. */
  attempts: number
}

/** One operation waiting for its turn's call. */
interface Step {
  operation: string
  key: string
  /** The step's kind and arguments, as the script reads them from ARGV. */
  argv: StepArgument[]
  /** Bytes the step adds to its call, roughly: a call is kept below MAX_CALL_BYTES. */
  bytes: number
  resolve: (reply: StepReply) => void
  reject: (error: Error) => void
  /** A delete of a lost insert: tried again when its call fails. */
  retry: Undo | undefined
  /** An insert's owner and expiry: what a delete of it, should its outcome be lost, needs. */
  claim: Pick<Undo, 'owner' | 'expiresAt'> | undefined
}

/** The command `defineCommand` adds to the client: numkeys, the keys, then ARGV. */
interface ScriptedClient {
  idempotencyStepsBuffer (...arguments_: StepArgument[]): Promise<StepReply[]>
  status: string
  isCluster?: boolean
  once?: RedisClient['once']
}

const NEWLINE = 0x0a
// A record's first byte: its state, or l for a processing record whose lease lapsed.
const STATES: Partial<Record<number, RecordState>> = { 0x70: 'processing', 0x50: 'processing', 0x6c: 'processing', 0x4c: 'processing', 0x63: 'completed', 0x68: 'halted' }
// l, or L for a marked one.
const leaseLapsed = (first: number | undefined): boolean => first === 0x6c || first === 0x4c
const notARecord = (): Error => new Error('redis record is not one this store wrote')
const INSERTED: InsertResult = Object.freeze({ inserted: true })
const TOOK_OVER: InsertResult = Object.freeze({ inserted: true, tookOver: true })
// Keys a SCAN asks for at a time, when listing.
const SCAN_COUNT = 100
// While the client is reconnecting, a command would wait in ioredis's offline queue: fail at once.
const DISCONNECTED = new Set(['reconnecting', 'end', 'close'])
// A call takes at most this many steps, or this many bytes of bodies: a turn with more sends
// several calls, so that one script never holds Redis for long.
const MAX_CALL_STEPS = 64
const MAX_CALL_BYTES = 1024 * 1024
// Deletes of unknown inserts wait at most this many at a time, ride at most this many per call,
// and are tried in at most this many calls: a store that cannot reach Redis forgets them.
const MAX_UNDO_WAITING = 10_000
const MAX_UNDO_PER_CALL = 16
const MAX_UNDO_ATTEMPTS = 5
const ignore = (): void => {}
// ioredis's errors for a command it never wrote: its offline queue is off, or it gave up
// reconnecting while the command waited there.
const neverSent = (error: unknown): boolean => error instanceof Error &&
  (error.name === 'MaxRetriesPerRequestError' || error.message.endsWith('enableOfflineQueue options is false'))
const validateOptions = compileOptions(RedisStoreOptionsSchema, { subject: 'RedisStore', prefix: '' })

/**
 * Keeps records in Redis (or a Redis Cluster), shared by every instance of the app. Each
 * operation is one step of a Lua script on one key; the operations of requests that arrive
 * together share one call. Records expire through Redis itself, so `prune` has nothing to do.
 *
 * @example
 * await app.register(fastifyRedis, { url: process.env.REDIS_URL })
 * await app.register(idempotency, { store: new RedisStore({ client: app.redis }) })
 */
export class RedisStore implements IdempotencyStore {
  readonly name = 'redis'
  readonly prefix: string
  readonly timeout: number
  readonly replicas: number
  #client: ScriptedClient
  #steps: Step[] = []
  #sendScheduled = false
  #sendSteps = (): void => { this.#send() }
  // Deletes of inserts whose call timed out or failed: they go out once the client is ready,
  // ahead of that call's own steps.
  #undos: Undo[] = []
  // Deletes whose own call failed: back in #undos a timeout later.
  #retrying: Undo[] = []
  #undoWhenReady = false
  #undoRetry: ReturnType<typeof setTimeout> | undefined
  // Who waits for which key's record, by channel: the store's connection for them, opened on first use.
  #subscriber: Subscriber | undefined
  #watchers = new Watchers()
  readonly #sharded: boolean
  // Closes of the client's connection: a WAIT answered on another connection than its writes'.
  #closes = 0
  // ioredis's own keyPrefix: the script's keys and channels carry it, SCAN's patterns do not.
  readonly #keyPrefix: string
  constructor (options: RedisStoreOptions) {
    const settings = validateOptions(options)
    this.prefix = settings.prefix
    this.#keyPrefix = settings.client.options?.keyPrefix ?? ''
    this.timeout = settings.timeout
    this.replicas = settings.replicas
    this.#sharded = settings.client.isCluster === true
    // A Cluster's WAIT would have to go to the connection of the key's node, which ioredis does not expose.
    if (this.replicas > 0 && this.#sharded) throw new InvalidOptionError('RedisStore option replicas is not supported on a Redis Cluster')
    if (this.replicas > 0) (settings.client.on as NonNullable<RedisClient['on']>).call(settings.client, 'close', () => { this.#closes++ })
    // Without numberOfKeys, each call says how many keys it has.
    settings.client.defineCommand('idempotencySteps', { lua: `local PUBLISH = '${this.#sharded ? 'SPUBLISH' : 'PUBLISH'}'\n${STEPS}` })
    this.#client = settings.client as unknown as ScriptedClient
  }

  async insert (key: string, record: NewRecord): Promise<InsertResult> {
    const origin = record.identity === undefined && record.createdAt === undefined ? '' : identityJson({ createdAt: record.createdAt, identity: record.identity })
    // The key expires px ms after it is claimed, by Redis's clock, and the lease ~<ms> before that.
    const px = Math.max(1, record.expiresAt - Date.now())
    const claimed = `p\n${record.expiresAt}\n${Buffer.byteLength(record.fingerprint)}\n${record.fingerprint}~${Math.max(0, px - record.lease)}\n${record.owner}\n${origin}`
    const reply = await this.#step('insert', this.prefix + key, ['i', claimed, px, record.takeOverExpiredLease ? 1 : 0], 0,
      { owner: record.owner, expiresAt: record.expiresAt })
    if (typeof reply === 'number') return reply === 2 ? TOOK_OVER : INSERTED
    return { inserted: false, record: this.#toRecord(reply) }
  }

  async lookup (key: string): Promise<IdempotencyRecord | undefined> {
    const reply = await this.#step('lookup', this.prefix + key, ['l'], 0)
    return reply === 0 ? undefined : this.#toRecord(reply as Buffer, true)
  }

  async remove (key: string): Promise<boolean> {
    return await this.#step('remove', this.prefix + key, ['x'], 0) === 1
  }

  /**
   * SCANs the keys under the prefix (every master of a Cluster in turn) and reads each. The
   * cursor names the node, the SCAN cursor of the batch a page ended in, and the last key it took
   * from that batch, which is scanned again from there: a record may be listed twice (SCAN may
   * return a key twice, and a batch whose last key went is read again whole), never skipped.
   */
  async list (query: ListQuery): Promise<ListPage> {
    const client = this.#client as unknown as RedisClient
    const nodes = client.isCluster === true ? (client.nodes as NonNullable<RedisClient['nodes']>)('master') : [client as Scanner]
    const parts = query.cursor?.split(':') ?? []
    // SCAN neither adds nor strips ioredis's own keyPrefix, as the client does for commands.
    const prefix = this.#keyPrefix + this.prefix
    const pattern = `${prefix.replace(/[*?[\]\\]/g, '\\$&')}*`
    const records: ListedRecord[] = []
    let after = parts.slice(2).join(':')
    for (let at = Number(parts[0] ?? 0), cursor = parts[1] ?? '0'; at < nodes.length;) {
      const scanned = (nodes[at] as Scanner).scan(cursor, 'MATCH', pattern, 'COUNT', SCAN_COUNT)
      const [next, found] = await withTimeout(scanned, this.timeout, `redis list timed out after ${this.timeout} ms`)
      const keys = found.map((key) => key.slice(prefix.length))
      const resume = keys.indexOf(after)
      const batch = (await Promise.all(keys.slice(resume + 1).map(async (key) => await this.#listed(key, query.state)))).filter((record) => record !== undefined)
      const room = query.limit - records.length
      if (batch.length > room) {
        records.push(...batch.slice(0, room))
        return { records, cursor: `${at}:${cursor}:${(records[records.length - 1] as ListedRecord).key}` }
      }
      records.push(...batch)
      after = ''
      if (next === '0') at++
      cursor = next
      if (records.length === query.limit) return { records, cursor: at < nodes.length ? `${at}:${cursor}:` : undefined }
    }
    return { records, cursor: undefined }
  }

  async #listed (key: string, state: ListQuery['state']): Promise<ListedRecord | undefined> {
    // A value under the prefix that this store did not write (or of another type) is not listed;
    // a failure to reach Redis fails the listing.
    const record = await this.lookup(key).catch((error: unknown) => {
      if (error instanceof Error && (error.message === notARecord().message || error.name === 'ReplyError')) return undefined
      throw error
    })
    if (record === undefined || record.state === 'completed') return undefined
    if (record.state === 'halted' ? state === 'lapsed' : state === 'halted' || !record.leaseExpired) return undefined
    return { key, state: record.state, leaseExpired: record.leaseExpired, expiresAt: record.expiresAt, createdAt: record.createdAt, identity: record.identity }
  }

  async update (key: string, owner: string, update: RecordUpdate): Promise<boolean> {
    let argv: StepArgument[]
    let bytes = 0
    if (update.state === 'processing') {
      argv = ['r', owner, update.lease]
    } else if (update.state === 'halted') {
      argv = ['h', owner, update.expiresAt]
    } else {
      const { statusCode, headers, body } = update.response
      // The headers as a string, as the other arguments mostly are: one Buffer among them makes
      // ioredis copy the whole command into a new Buffer.
      argv = ['c', owner, update.expiresAt, `${statusCode}\n${JSON.stringify(headers)}\n`, body]
      bytes = body.length
    }
    return await this.#step('update', this.prefix + key, argv, bytes) === 1
  }

  async delete (key: string, owner: string): Promise<boolean> {
    return await this.#step('delete', this.prefix + key, ['d', owner], 0) === 1
  }

  /**
   * Tells `listener` when the record under `key` completes, halts or is deleted: the key's channel
   * is subscribed to, then the record marked, so that its end is published; then the listener is
   * told once, since the end may have come before the mark. A reconnect tells every listener, as
   * messages may have been lost meanwhile. Waiters look again on their own too.
   */
  watch (key: string, listener: () => void): () => void {
    const client = this.#client as unknown as RedisClient
    if (client.duplicate === undefined) return ignore
    const channel = this.#keyPrefix + this.prefix + key
    const duplicate = client.duplicate.bind(client)
    return this.#watchers.add(channel, listener, (tell) => {
      const subscriber = this.#subscriber ?? this.#subscribe(duplicate)
      const subscribed = this.#sharded ? subscriber.ssubscribe(channel) : subscriber.subscribe(channel)
      subscribed.then(() => this.#step('watch', this.prefix + key, ['w'], 0)).then(tell, ignore)
    }, () => {
      const subscriber = this.#subscriber
      ;(this.#sharded ? subscriber?.sunsubscribe(channel) : subscriber?.unsubscribe(channel))?.catch(ignore)
    })
  }

  /** Closes the connection `watch` opened; the client passed in stays open. */
  close (): void {
    this.#subscriber?.disconnect()
    this.#subscriber = undefined
    this.#watchers.clear()
  }

  #subscribe (duplicate: NonNullable<RedisClient['duplicate']>): Subscriber {
    // ioredis's own resubscription leaves its promise unhandled when the connection closes again:
    // the store subscribes again itself. A Cluster's sharded subscribers resubscribe on their own.
    const subscriber = this.#sharded ? duplicate([], { shardedSubscribers: true }) : duplicate({ autoResubscribe: false })
    this.#subscriber = subscriber
    subscriber.on(this.#sharded ? 'smessage' : 'message', (channel) => {
      this.#watchers.tell(channel)
    })
    // Ready again after a reconnect, messages may have been lost meanwhile: every waiter looks again
    // (at the first connection too, which costs a look).
    const tellAll = (): void => { this.#watchers.tellAll() }
    subscriber.on(this.#sharded ? 'subscribersReady' : 'ready', () => {
      const channels = this.#watchers.keys()
      const subscribed = this.#sharded || channels.length === 0 ? Promise.resolve() : subscriber.subscribe(...channels)
      subscribed.then(tellAll, tellAll)
    })
    // A failed connection is retried by ioredis; the waiters look again on their own meanwhile.
    subscriber.on('error', ignore)
    return subscriber
  }

  /** Redis expires records itself. */
  async prune (): Promise<number> {
    return 0
  }

  // `details`: the lease's end and the record's origin too, for operators.
  #toRecord (reply: Buffer, details = false): IdempotencyRecord {
    const state = STATES[reply[0] as number]
    const expiresEnd = reply.indexOf(NEWLINE, 2)
    const lengthEnd = reply.indexOf(NEWLINE, expiresEnd + 1)
    const fingerprintEnd = lengthEnd + 1 + Number(reply.toString('latin1', expiresEnd + 1, lengthEnd))
    // Not NaN, nor negative, nor past the end: otherwise the value was written by something else.
    if (state === undefined || !(expiresEnd > 1 && lengthEnd > expiresEnd && fingerprintEnd > lengthEnd && fingerprintEnd <= reply.length)) {
      throw notARecord()
    }
    let response: StoredResponse | undefined
    if (state === 'completed') {
      const statusEnd = reply.indexOf(NEWLINE, fingerprintEnd)
      const headersEnd = reply.indexOf(NEWLINE, statusEnd + 1)
      if (statusEnd === -1 || headersEnd === -1) throw notARecord()
      response = {
        statusCode: Number(reply.toString('latin1', fingerprintEnd, statusEnd)),
        headers: JSON.parse(reply.toString('utf8', statusEnd + 1, headersEnd)) as StoredResponse['headers'],
        body: reply.subarray(headersEnd + 1)
      }
    }
    const record: IdempotencyRecord = {
      state,
      fingerprint: reply.toString('utf8', lengthEnd + 1, fingerprintEnd),
      expiresAt: Number(reply.toString('latin1', 2, expiresEnd)),
      leaseExpired: leaseLapsed(reply[0]),
      response
    }
    if (details && state !== 'completed') withOrigin(record, reply, fingerprintEnd)
    return record
  }

  #step (operation: string, key: string, argv: StepArgument[], bytes: number, claim?: Step['claim']): Promise<StepReply> {
    const status = this.#client.status
    if (DISCONNECTED.has(status)) return Promise.reject(new Error(`redis ${operation} failed: the client is ${status}`))
    return new Promise((resolve, reject) => {
      this.#scheduleSend()
      this.#steps.push({ operation, key, argv, bytes, resolve, reject, retry: undefined, claim })
    })
  }

  // The first step of a turn schedules the call; it goes out once the turn's I/O is done.
  #scheduleSend (): void {
    if (this.#sendScheduled) return
    this.#sendScheduled = true
    setImmediate(this.#sendSteps)
  }

  #waitToUndo (undo: Undo): void {
    if (undo.attempts >= MAX_UNDO_ATTEMPTS || this.#undos.length + this.#retrying.length >= MAX_UNDO_WAITING) return
    if (undo.attempts === 0) {
      this.#undos.push(undo)
      this.#scheduleSend()
      return
    }
    this.#retrying.push(undo)
    this.#undoRetry ??= setTimeout(() => {
      this.#undoRetry = undefined
      for (const retry of this.#retrying) this.#undos.push(retry)
      this.#retrying = []
      this.#scheduleSend()
    }, this.timeout).unref()
  }

  // Deletes wait for `ready`: a client that is connecting would queue them (or, without its
  // offline queue, fail them at once, spending their attempts).
  #send (): void {
    this.#sendScheduled = false
    let steps = this.#steps
    this.#steps = []
    if (this.#undos.length > 0) {
      if (this.#client.status === 'ready') steps = this.#withUndos(steps)
      else this.#sendWhenReady()
    }
    if (steps.length === 0) return
    const perCall = this.#client.isCluster === true ? 1 : MAX_CALL_STEPS
    let first = 0
    let bytes = 0
    for (let index = 0; index < steps.length; index++) {
      bytes += (steps[index] as Step).bytes
      if (index + 1 === steps.length || index + 1 - first === perCall || bytes + (steps[index + 1] as Step).bytes > MAX_CALL_BYTES) {
        this.#call(first === 0 && index + 1 === steps.length ? steps : steps.slice(first, index + 1))
        first = index + 1
        bytes = 0
      }
    }
  }

  #sendWhenReady (): void {
    if (this.#undoWhenReady || this.#client.once === undefined) return
    this.#undoWhenReady = true
    this.#client.once('ready', () => {
      this.#undoWhenReady = false
      this.#scheduleSend()
    })
  }

  #withUndos (steps: Step[]): Step[] {
    const undos = this.#undos.splice(0, MAX_UNDO_PER_CALL)
    const now = Date.now()
    const deletes: Step[] = []
    for (const undo of undos) {
      if (undo.expiresAt <= now) continue
      const retry: Undo = { ...undo, attempts: undo.attempts + 1 }
      deletes.push({ operation: 'delete', key: undo.key, argv: ['d', undo.owner], bytes: 0, resolve: ignore, reject: ignore, retry, claim: undefined })
    }
    // More wait than one call takes: the next call takes them.
    if (this.#undos.length > 0) this.#scheduleSend()
    for (const step of steps) deletes.push(step)
    return deletes
  }

  // An insert whose call times out or fails may have run, or may still run (ioredis sends again
  // what a dropped connection left unanswered): once ioredis is done with its call, a
  // delete-if-owner follows it, so that a request that got no answer holds no key.
  #lostInsert (step: Step): void {
    if (step.claim === undefined) return
    this.#waitToUndo({ key: step.key, owner: step.claim.owner, expiresAt: step.claim.expiresAt, attempts: 0 })
  }

  // One WAIT for the writes of a call, on the connection that made them. A claimed key that too
  // few replicas have is given back, so that the request that gets 503 holds no key.
  #replicate (written: Array<[Step, StepReply]>): void {
    const wait = (this.#client as unknown as RedisClient).wait as NonNullable<RedisClient['wait']>
    const closes = this.#closes
    const acknowledged = withTimeout(Promise.resolve().then(() => wait.call(this.#client, this.replicas, this.timeout)), this.timeout * 2,
      `redis WAIT did not answer within ${this.timeout * 2} ms`)
    acknowledged.then((count) => {
      // ioredis sends a WAIT again on a new connection, whose writes are none: then it proves nothing.
      if (count >= this.replicas && this.#closes === closes) return count
      throw new Error(`redis WAIT: ${count} of ${this.replicas} replicas acknowledged within ${this.timeout} ms`)
    }).then(() => {
      for (const [step, reply] of written) step.resolve(reply)
    }, (error: unknown) => {
      for (const [step] of written) {
        this.#lostInsert(step)
        step.reject(error as Error)
      }
    })
  }

  #call (steps: Step[]): void {
    const arguments_: StepArgument[] = [steps.length]
    for (const step of steps) arguments_.push(step.key)
    for (const step of steps) for (const argument of step.argv) arguments_.push(argument)
    let pending = true
    const timer = setTimeout(() => {
      pending = false
      for (const step of steps) step.reject(new Error(`redis ${step.operation} timed out after ${this.timeout} ms`))
    }, this.timeout)
    let sent: Promise<StepReply[]>
    let thrown = false
    try {
      sent = this.#client.idempotencyStepsBuffer(...arguments_)
    } catch (error) {
      // Thrown rather than rejected (by a client that is not ioredis): fail the steps, not the timer.
      thrown = true
      sent = Promise.reject(error)
    }
    // The deletes wait until ioredis is done with the call: it never sends it again after that (not
    // so for a command ioredis itself timed out: the README says to leave commandTimeout unset), so
    // a delete sent then runs after it, whatever connection or Cluster node either goes through.
    sent.then((replies) => {
      if (!pending) {
        for (const step of steps) this.#lostInsert(step)
        return
      }
      pending = false
      clearTimeout(timer)
      const written: Array<[Step, StepReply]> = []
      for (let index = 0; index < steps.length; index++) {
        const step = steps[index] as Step
        const reply = replies[index] as StepReply | Error
        if (reply instanceof Error) step.reject(reply)
        else if (this.replicas > 0 && isDurable(step, reply)) written.push([step, reply])
        else step.resolve(reply)
      }
      if (written.length > 0) this.#replicate(written)
    }, (error: Error) => {
      // A call that never left this process wrote nothing; its deletes are still to be made.
      const lost = !thrown && !neverSent(error)
      for (const step of steps) {
        if (step.retry !== undefined) this.#waitToUndo(step.retry)
        else if (lost) this.#lostInsert(step)
      }
      if (!pending) return
      pending = false
      clearTimeout(timer)
      for (const step of steps) step.reject(error)
    })
  }
}

// A claimed key (an insert answered 1 or 2) and a saved response: what `replicas` waits for.
function isDurable (step: Step, reply: StepReply): boolean {
  return typeof reply === 'number' && reply > 0 && (step.operation === 'insert' || (step.operation === 'update' && step.argv[0] === 'c'))
}

// A processing record's lease end, and a processing or halted record's origin, when it has one.
function withOrigin (record: IdempotencyRecord, reply: Buffer, fingerprintEnd: number): void {
  let originStart = fingerprintEnd
  if (record.state === 'processing') {
    const leaseEnd = reply.indexOf(NEWLINE, fingerprintEnd)
    const ownerEnd = reply.indexOf(NEWLINE, leaseEnd + 1)
    record.leaseExpiresAt = Number(reply.toString('latin1', fingerprintEnd, leaseEnd))
    originStart = ownerEnd === -1 ? reply.length : ownerEnd + 1
  }
  if (originStart >= reply.length) return
  const origin = parseIdentityJson<Pick<IdempotencyRecord, 'createdAt' | 'identity'>>(reply.toString('utf8', originStart))
  if (origin.createdAt !== undefined) record.createdAt = origin.createdAt
  if (origin.identity !== undefined) record.identity = origin.identity
}

import Type from 'typebox'
import { compileOptions, withDefault } from '../options-validator.js'
import { withTimeout } from './timeout.js'
import type {
  IdempotencyRecord,
  IdempotencyStore,
  InsertResult,
  NewRecord,
  RecordState,
  RecordUpdate
} from './store.js'

/**
 * What the store needs of an ioredis client: a single `Redis` or a `Cluster` (e.g. `app.redis`
 * of @fastify/redis) fits. Described by its shape so that the types do not depend on ioredis
 * being installed.
 */
export interface RedisClient {
  defineCommand (name: string, definition: { numberOfKeys: number, lua: string }): void
  readonly status: string
}

const RedisStoreOptionsSchema = Type.Object({
  client: Type.Unsafe<RedisClient>(Type.Object({ defineCommand: Type.Function([], Type.Any()) }, {
    description: 'an ioredis client (Redis or Cluster)'
  })),
  prefix: Type.Optional(withDefault(Type.String(), 'idem:')),
  timeout: Type.Optional(withDefault(Type.Integer({ minimum: 1 }), 1000))
}, { additionalProperties: false })

export interface RedisStoreOptions {
  /** The client; the store defines its scripts on it and never closes it. */
  client: RedisClient
  /** Put before every key. Default `idem:`. */
  prefix?: string
  /** ms a call may take before it fails (and the request gets 503). Default 1000. */
  timeout?: number
}

// A record is one Redis hash: s state (p/c/h), f fingerprint, o owner, e expiresAt (ms),
// l lease end (ms, Redis clock), and once completed c status, h headers (JSON), b body bytes.
// Every script touches one key, so the store works on a Redis Cluster too. Leases are judged by
// Redis's own clock (TIME) so that app servers whose clocks differ never disagree about them.
const NOW = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)`

const RECORD_REPLY = `{r[1], r[2], r[3], (r[1] == 'p' and tonumber(r[4]) <= now) and 1 or 0, r[5], r[6], r[7]}`

const INSERT = `local r = redis.call('HMGET', KEYS[1], 's', 'f', 'e', 'l', 'c', 'h', 'b')
${NOW}
if r[1] then
  local lapsed = r[1] == 'p' and tonumber(r[4]) <= now
  if not (lapsed and ARGV[5] == '1' and r[2] == ARGV[1]) then
    return ${RECORD_REPLY}
  end
end
redis.call('HSET', KEYS[1], 's', 'p', 'f', ARGV[1], 'o', ARGV[2], 'e', ARGV[3], 'l', now + tonumber(ARGV[4]))
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1`

const LOOKUP = `local r = redis.call('HMGET', KEYS[1], 's', 'f', 'e', 'l', 'c', 'h', 'b')
if not r[1] then return nil end
${NOW}
return ${RECORD_REPLY}`

const UPDATE = `local r = redis.call('HMGET', KEYS[1], 's', 'o', 'e')
if r[1] ~= 'p' or r[2] ~= ARGV[1] then return 0 end
if ARGV[2] == 'r' then
  ${NOW}
  local leaseEnd = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'l', leaseEnd)
  if tonumber(r[3]) < leaseEnd then
    redis.call('HSET', KEYS[1], 'e', leaseEnd)
    redis.call('PEXPIREAT', KEYS[1], leaseEnd)
  end
  return 1
end
if ARGV[2] == 'h' then
  redis.call('HSET', KEYS[1], 's', 'h', 'e', ARGV[3])
else
  redis.call('HSET', KEYS[1], 's', 'c', 'e', ARGV[3], 'c', ARGV[4], 'h', ARGV[5], 'b', ARGV[6])
end
redis.call('HDEL', KEYS[1], 'o', 'l')
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1`

const DELETE = `local r = redis.call('HMGET', KEYS[1], 's', 'o')
if r[1] ~= 'p' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1`

type RecordReply = [Buffer, Buffer, Buffer, number, Buffer | null, Buffer | null, Buffer | null]

/** The commands `defineCommand` adds to the client. */
interface ScriptedClient {
  idempotencyInsertBuffer (key: string, fingerprint: string, owner: string, expiresAt: number, lease: number, takeOver: number): Promise<RecordReply | 1>
  idempotencyLookupBuffer (key: string): Promise<RecordReply | null>
  idempotencyUpdate (key: string, owner: string, kind: string, ...values: Array<string | number | Buffer>): Promise<number>
  idempotencyDelete (key: string, owner: string): Promise<number>
  status: string
}

const STATES: Record<string, RecordState> = { p: 'processing', c: 'completed', h: 'halted' }
const INSERTED: InsertResult = Object.freeze({ inserted: true })
// While the client is reconnecting, a command would wait in ioredis's offline queue: fail at once.
const DISCONNECTED = new Set(['reconnecting', 'end', 'close'])
const validateOptions = compileOptions(RedisStoreOptionsSchema, { subject: 'RedisStore', prefix: '' })

/**
 * Keeps records in Redis (or a Redis Cluster), shared by every instance of the app. Each
 * operation is one round trip running one Lua script on one key; records expire through Redis
 * itself, so `prune` has nothing to do.
 *
 * @example
 * await app.register(fastifyRedis, { url: process.env.REDIS_URL })
 * await app.register(idempotency, { store: new RedisStore({ client: app.redis }) })
 */
export class RedisStore implements IdempotencyStore {
  readonly prefix: string
  readonly timeout: number
  #client: ScriptedClient

  constructor (options: RedisStoreOptions) {
    const settings = validateOptions(options)
    this.prefix = settings.prefix
    this.timeout = settings.timeout
    const client = settings.client
    client.defineCommand('idempotencyInsert', { numberOfKeys: 1, lua: INSERT })
    client.defineCommand('idempotencyLookup', { numberOfKeys: 1, lua: LOOKUP })
    client.defineCommand('idempotencyUpdate', { numberOfKeys: 1, lua: UPDATE })
    client.defineCommand('idempotencyDelete', { numberOfKeys: 1, lua: DELETE })
    this.#client = client as unknown as ScriptedClient
  }

  async insert (key: string, record: NewRecord): Promise<InsertResult> {
    const redisKey = this.prefix + key
    const reply = await this.#call('insert', () => this.#client.idempotencyInsertBuffer(
      redisKey, record.fingerprint, record.owner, record.expiresAt, record.lease, record.takeOverExpiredLease ? 1 : 0
    ), () => {
      // The insert may still run once Redis answers: a delete sent after it, on the same
      // connection, runs after it and removes the record, so a timed-out request holds no key.
      this.#client.idempotencyDelete(redisKey, record.owner).catch(() => {})
    })
    return reply === 1 ? INSERTED : { inserted: false, record: toRecord(reply) }
  }

  async lookup (key: string): Promise<IdempotencyRecord | undefined> {
    const reply = await this.#call('lookup', () => this.#client.idempotencyLookupBuffer(this.prefix + key))
    return reply === null ? undefined : toRecord(reply)
  }

  async update (key: string, owner: string, update: RecordUpdate): Promise<boolean> {
    const redisKey = this.prefix + key
    const client = this.#client
    let send: () => Promise<number>
    if (update.state === 'processing') {
      send = () => client.idempotencyUpdate(redisKey, owner, 'r', update.lease)
    } else if (update.state === 'halted') {
      send = () => client.idempotencyUpdate(redisKey, owner, 'h', update.expiresAt)
    } else {
      const { statusCode, headers, body } = update.response
      send = () => client.idempotencyUpdate(redisKey, owner, 'c', update.expiresAt, statusCode, JSON.stringify(headers), body)
    }
    return await this.#call('update', send) === 1
  }

  async delete (key: string, owner: string): Promise<boolean> {
    return await this.#call('delete', () => this.#client.idempotencyDelete(this.prefix + key, owner)) === 1
  }

  /** Redis expires records itself. */
  async prune (): Promise<number> {
    return 0
  }

  async #call<Reply> (operation: string, send: () => Promise<Reply>, onTimeout?: () => void): Promise<Reply> {
    if (DISCONNECTED.has(this.#client.status)) {
      throw new Error(`redis ${operation} failed: the client is ${this.#client.status}`)
    }
    return await withTimeout(send(), this.timeout, `redis ${operation} timed out after ${this.timeout} ms`, onTimeout)
  }
}

function toRecord (reply: RecordReply): IdempotencyRecord {
  const state = STATES[reply[0].toString()] as RecordState
  return {
    state,
    fingerprint: reply[1].toString(),
    expiresAt: Number(reply[2]),
    leaseExpired: reply[3] === 1,
    response: state === 'completed'
      ? {
          statusCode: Number(reply[4]),
          headers: JSON.parse(String(reply[5])) as Record<string, string>,
          body: reply[6] as Buffer
        }
      : undefined
  }
}

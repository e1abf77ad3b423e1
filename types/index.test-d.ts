import Fastify, { type FastifyContextConfig, type FastifyRequest, type RouteShorthandOptions } from 'fastify'
import { expectAssignable, expectError, expectNotAssignable, expectType } from 'tsd'
import { Redis as IORedis } from 'ioredis'
import pg from 'pg'
import idempotency, {
  AlreadyRegisteredError,
  BodyUnseenError,
  ConflictError,
  HaltedError,
  idempotency as namedIdempotency,
  InvalidOptionError,
  KeyInvalidError,
  KeyMissingError,
  KeyMultipleError,
  MemoryStore,
  MismatchError,
  PostgresStore,
  RedisStore,
  RequestTracker,
  StoreUnavailableError,
  type Awaitable,
  type IdempotencyError,
  type IdempotencyOptions,
  type IdempotencyRecord,
  type IdempotencyRouteOptions,
  type IdempotencyStore,
  type InsertResult,
  type NewRecord,
  type RecordUpdate,
  type StoredResponse,
  type TrackOptions,
  type TrackResult,
  type FoundRecord,
  type ListPage,
  type RequestIdentity,
  type RequestMessage,
  type SettleMessage,
  requestChannel,
  storeChannel
} from 'fastify-idempotency'
import { instrumentIdempotency } from 'fastify-idempotency/otel'

const app = Fastify()

// The named export and the default export are the same plugin.
expectType<typeof idempotency>(namedIdempotency)

// Valid options are accepted, alone, all together, and with Fastify's own register options.
app.register(idempotency)
app.register(idempotency, {})
app.register(idempotency, {
  cacheTtl: 60_000,
  prune: 1000,
  processingTtl: 10_000,
  store: new MemoryStore({ maxBytes: 1024 * 1024 }),
  header: 'idempotency-key',
  methods: ['POST', 'PUT'],
  global: true,
  required: false,
  maxKeyLength: 255,
  scope: (request) => {
    expectType<FastifyRequest>(request)
    return 'tenant'
  },
  fingerprint: (request) => request.body,
  maxResponseSize: 0,
  releaseOnError: true,
  excludeHeaders: ['set-cookie'],
  problemDetails: true
})
app.register(idempotency, { prefix: '/api', logLevel: 'warn', cacheTtl: 1000 })
app.register(idempotency, { scope: async (request) => request.ip })

// Options of the wrong type are refused.
expectError(app.register(idempotency, { cacheTtl: 'x' }))
expectError(app.register(idempotency, { store: 42 }))
expectError(app.register(idempotency, { scope: 1 }))
expectError(app.register(idempotency, { scope: () => 1 }))
expectError(app.register(idempotency, { methods: 'POST' }))
expectError(app.register(idempotency, { problemDetails: 'yes' }))
expectError(app.register(idempotency, { bogus: true }))
expectAssignable<IdempotencyOptions>({ cacheTtl: 1, store: new MemoryStore() })
expectNotAssignable<IdempotencyOptions>({ cacheTtl: '1' })
expectNotAssignable<IdempotencyOptions>({ store: {} })

// A store written by the user is accepted when it implements IdempotencyStore.
class UserStore implements IdempotencyStore {
  async insert (_key: string, _record: NewRecord): Promise<InsertResult> { return { inserted: true } }
  async lookup (_key: string): Promise<IdempotencyRecord | undefined> { return undefined }
  async update (_key: string, _owner: string, _update: RecordUpdate): Promise<boolean> { return true }
  async delete (_key: string, _owner: string): Promise<boolean> { return true }
  async prune (): Promise<number> { return 0 }
}
app.register(idempotency, { store: new UserStore() })

// A store may answer directly, as the memory store does, and say it keeps records in process.
class SyncUserStore implements IdempotencyStore {
  readonly inProcess = true
  insert (_key: string, _record: NewRecord): InsertResult { return { inserted: true } }
  lookup (_key: string): IdempotencyRecord | undefined { return undefined }
  update (_key: string, _owner: string, _update: RecordUpdate): boolean { return true }
  delete (_key: string, _owner: string): boolean { return true }
  prune (): number { return 0 }
}
app.register(idempotency, { store: new SyncUserStore() })
expectType<number>(new SyncUserStore().prune())
expectType<Awaitable<number>>((new SyncUserStore() as IdempotencyStore).prune())
expectNotAssignable<IdempotencyStore>({ ...new SyncUserStore(), inProcess: 'yes' })
expectAssignable<IdempotencyStore>(new MemoryStore())
expectNotAssignable<IdempotencyStore>({ insert: async () => ({ inserted: true }) })

// The decorators.
expectType<RequestTracker>(app.idempotency)
expectType<IdempotencyStore>(app.idempotency.store)
const trackOptions: TrackOptions = { cacheTtl: 1000, processingTtl: 100, releaseOnError: false }
// The tracker answers as its store does: directly or through a promise; `await` fits both.
expectType<Awaitable<TrackResult>>(app.idempotency.track('key', 'fingerprint', trackOptions))
declare const stored: StoredResponse
expectType<Awaitable<boolean>>(app.idempotency.putResponse('key', 'owner', stored, Date.now() + 1000))
expectAssignable<StoredResponse>({ statusCode: 200, headers: {}, body: 'text' })
expectAssignable<StoredResponse>({ statusCode: 200, headers: {}, body: Buffer.from('bytes') })
expectNotAssignable<StoredResponse>({ statusCode: 200, headers: {}, body: 42 })
expectError(app.idempotency.putResponse('key', 'owner', { statusCode: 200 }, 0))

app.post('/orders', async (request) => {
  expectType<string | undefined>(request.idempotencyKey)
  return {}
})

// Route config: true, false, or route options; nothing else.
app.post('/a', { config: { idempotency: true } }, async () => ({}))
app.post('/b', { config: { idempotency: false } }, async () => ({}))
app.post('/c', {
  config: {
    idempotency: {
      cacheTtl: 1000,
      scope: (request) => {
        expectType<FastifyRequest>(request)
        return 'x'
      }
    }
  }
}, async () => ({}))
app.route({ method: 'PATCH', url: '/d', config: { idempotency: { required: false, releaseOnError: true } }, handler: async () => ({}) })
expectError(app.post('/e', { config: { idempotency: { cacheTtl: '1000' } } }, async () => ({})))
// Inline, Fastify infers a route's ContextConfig generic from the literal and intersects it with
// FastifyContextConfig, which lets unknown keys and other types through; typed options catch them.
expectError<RouteShorthandOptions>({ config: { idempotency: { bogus: 1 } } })
expectError<RouteShorthandOptions>({ config: { idempotency: 'yes' } })
expectAssignable<RouteShorthandOptions>({ config: { idempotency: { cacheTtl: 1000, scope: (request: FastifyRequest) => request.ip } } })
expectAssignable<FastifyContextConfig>({ idempotency: true })
expectNotAssignable<FastifyContextConfig>({ idempotency: { bogus: 1 } })
expectNotAssignable<FastifyContextConfig>({ idempotency: 'yes' })
expectAssignable<IdempotencyRouteOptions>({ processingTtl: 100, maxResponseSize: 10, fingerprint: (request: FastifyRequest) => request.body })
expectNotAssignable<IdempotencyRouteOptions>({ header: 'x-key' })

// Errors carry their status, code and RFC 9457 problem fields.
const missing = new KeyMissingError('Idempotency-Key')
expectType<IdempotencyError>(missing)
expectType<number>(missing.statusCode)
expectType<string>(missing.code)
expectType<string>(missing.type)
expectType<string>(missing.title)
expectType<string>(missing.detail)
expectType<IdempotencyError>(KeyMissingError('Idempotency-Key'))
expectType<IdempotencyError>(new KeyMultipleError('Idempotency-Key'))
expectType<IdempotencyError>(new KeyInvalidError('Idempotency-Key', 255))
expectType<IdempotencyError>(new ConflictError())
expectType<IdempotencyError>(new BodyUnseenError())
expectType<'FST_IDEMPOTENCY_ALREADY_REGISTERED'>(new AlreadyRegisteredError().code)
expectType<IdempotencyError>(new MismatchError())
expectType<IdempotencyError>(new HaltedError())
expectType<IdempotencyError>(new StoreUnavailableError())
expectType<Readonly<Record<string, string>> | undefined>(new ConflictError().headers)
expectType<string>(new ConflictError().toProblemDetails('/orders').instance)
expectError(new KeyMissingError())
expectError(new KeyInvalidError('Idempotency-Key', '255'))
const invalid = new InvalidOptionError('cacheTtl must be >= 1')
expectType<'FST_IDEMPOTENCY_INVALID_OPTION'>(invalid.code)
expectAssignable<Error>(invalid)
expectError(new InvalidOptionError())

// TrackResult narrows on status.
declare const result: TrackResult
if (result.status === 'created') {
  expectType<string>(result.owner)
  expectError(result.response)
} else if (result.status === 'completed') {
  expectType<StoredResponse>(result.response)
  expectError(result.owner)
} else {
  expectType<'processing' | 'halted' | 'mismatch'>(result.status)
  expectError(result.owner)
  expectError(result.response)
}
expectType<number>(result.expiresAt)

// RedisStore: takes an ioredis client (its shape, so the types need no ioredis install)
expectAssignable<IdempotencyStore>(new RedisStore({ client: new IORedis({ lazyConnect: true }) }))
expectType<RedisStore>(new RedisStore({ client: new IORedis({ lazyConnect: true }), prefix: 'x:', timeout: 500 }))
expectError(new RedisStore({ client: new IORedis({ lazyConnect: true }), timeout: '1s' }))
expectType<number>(new RedisStore({ client: new IORedis({ lazyConnect: true }), replicas: 1 }).replicas)
expectError(new RedisStore({ client: new IORedis({ lazyConnect: true }), replicas: '1' }))
expectError(new RedisStore({}))

// PostgresStore: takes a pg Pool, whose Client class and options make its LISTEN connection
expectType<PostgresStore>(new PostgresStore({ pool: new pg.Pool(), table: 'billing.requests' }))
expectType<PostgresStore>(new PostgresStore({ pool: { query: async () => ({ rows: [], rowCount: 0 }) } }))
expectError(new PostgresStore({ pool: {} }))
expectAssignable<IdempotencyOptions>({ store: 'redis' })
expectNotAssignable<IdempotencyOptions>({ store: 'postgres-please' })

// The operator API on the decorator: identities as a person knows a request.
const identity: RequestIdentity = { method: 'POST', route: '/orders/:id', params: { id: '42' }, key: 'abc', scope: 'user-1' }
expectType<Awaitable<FoundRecord | undefined>>(app.idempotency.find(identity))
expectType<Awaitable<boolean>>(app.idempotency.forget(identity))
expectType<Awaitable<ListPage>>(app.idempotency.list({ state: 'halted', limit: 10 }))
expectError(app.idempotency.list({ state: 'completed', limit: 10 }))
expectError(app.idempotency.find({ method: 'POST', route: '/orders' }))
expectType<string>(app.idempotency.keyOf(identity))

// The channels and their messages.
requestChannel.subscribe((message) => {
  const { outcome, route, record } = message as RequestMessage
  expectType<'executed' | 'takeover' | 'replayed' | 'conflict' | 'mismatch' | 'halted' | 'unavailable' | 'refused'>(outcome)
  expectType<string>(route)
  expectType<string | undefined>(record)
})
expectType<'completed' | 'halted' | 'released' | 'not-stored' | 'lost'>(({} as SettleMessage).outcome)
expectType<boolean>(storeChannel.hasSubscribers)

// fastify-idempotency/otel: an unsubscribe function.
expectType<() => void>(instrumentIdempotency())
expectError(instrumentIdempotency({ meter: 'default' }))

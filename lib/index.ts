import { idempotency } from './plugin.js'

export { idempotency }
export default idempotency
export { RequestTracker } from './tracker.js'
export type { FoundRecord, RequestTrackerOptions, TrackOptions, TrackResult, TrackerLogger } from './tracker.js'
export type { RequestIdentity } from './key.js'
export { requestChannel, settleChannel, storeChannel } from './diagnostics.js'
export type { RequestMessage, RequestOutcome, SettleMessage, SettleOutcome, StoreContext, StoreOperation } from './diagnostics.js'
export { MemoryStore } from './stores/memory.js'
export type { MemoryStoreOptions, WarningLogger } from './stores/memory.js'
export { RedisStore } from './stores/redis.js'
export type { RedisClient, RedisStoreOptions } from './stores/redis.js'
export { PostgresStore, POSTGRES_SCHEMA, postgresChannel, postgresSchema } from './stores/postgres.js'
export type { ListenClient, PostgresPool, PostgresQuery, PostgresStoreOptions } from './stores/postgres.js'
export type {
  Awaitable,
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
} from './stores/store.js'
export { PluginOptionsSchema, RouteOptionsSchema, HOP_BY_HOP_HEADERS } from './options.js'
export type { IdempotencyOptions, IdempotencyRouteOptions, ScopeFunction, FingerprintFunction } from './options.js'
export {
  AlreadyRegisteredError,
  BodyUnseenError,
  ConflictError,
  HaltedError,
  InvalidOptionError,
  KeyInvalidError,
  KeyMissingError,
  KeyMultipleError,
  MismatchError,
  StoreOperationMissingError,
  StoreUnavailableError
} from './errors.js'
export type { IdempotencyError, IdempotencyErrorConstructor, IdempotencyProblem } from './errors.js'

import Type, { type Static } from 'typebox'
import type { FastifyRequest } from 'fastify'
import type { IdempotencyStore } from './stores/store.js'
import { compileOptions, withDefault } from './options-validator.js'

/** Names the owner of a key (a user or tenant id): keys of different scopes never meet. */
export type ScopeFunction = (request: FastifyRequest) => string | Promise<string>
/** What must be equal when a key is reused; hashed in a canonical form. */
export type FingerprintFunction = (request: FastifyRequest) => unknown

// Timers take at most 2^31 - 1 ms; ten years is far past any sensible record life.
const TIMER_MAX = 2_147_483_647
const Milliseconds = (fallback: number, minimum = 1, maximum = TIMER_MAX) => withDefault(Type.Integer({ minimum, maximum }), fallback)
const Scope = Type.Unsafe<ScopeFunction>(Type.Function([Type.Any()], Type.Any()))
const FingerprintOption = Type.Unsafe<FingerprintFunction>(Type.Function([Type.Any()], Type.Any()))
const storeMethods = ['insert', 'lookup', 'update', 'delete', 'prune'] as const
const Store = Type.Unsafe<IdempotencyStore>(Type.Object(
  Object.fromEntries(storeMethods.map((name) => [name, Type.Function([], Type.Any())]))
))

// A token (RFC 9110), lower case as Node gives header names.
const HeaderName = Type.String({ pattern: "^[!#$%&'*+.^_`|~0-9a-z-]+$", description: 'a header name in lower case' })

export const HOP_BY_HOP_HEADERS = [
  'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'proxy-connection',
  'te', 'trailer', 'transfer-encoding', 'upgrade'
]

/** Options of a route, given as `config.idempotency`; each overrides the plugin's. */
export const RouteOptionsSchema = Type.Object({
  required: Type.Optional(Type.Boolean()),
  cacheTtl: Type.Optional(Type.Integer({ minimum: 1, maximum: 315_360_000_000 })),
  processingTtl: Type.Optional(Type.Integer({ minimum: 10, maximum: TIMER_MAX })),
  scope: Type.Optional(Scope),
  fingerprint: Type.Optional(FingerprintOption),
  maxResponseSize: Type.Optional(Type.Integer({ minimum: 0 })),
  releaseOnError: Type.Optional(Type.Boolean()),
  wait: Type.Optional(Type.Integer({ minimum: 0, maximum: TIMER_MAX }))
}, { additionalProperties: false })

/** The plugin's options: the single source of their rules and defaults. */
export const PluginOptionsSchema = Type.Object({
  cacheTtl: Type.Optional(Milliseconds(86_400_000, 1, 315_360_000_000)),
  prune: Type.Optional(Milliseconds(60_000)),
  processingTtl: Type.Optional(Milliseconds(60_000, 10)),
  store: Type.Optional(Type.Union([Store, Type.Literal('redis'), Type.Literal('postgres')], {
    description: `an IdempotencyStore (an object with ${storeMethods.join(', ')}), 'redis' or 'postgres'`
  })),
  header: Type.Optional(withDefault(HeaderName, 'idempotency-key')),
  methods: Type.Optional(withDefault(
    Type.Array(Type.String({ pattern: '^[A-Z]+$', description: 'an HTTP method in upper case' }), { minItems: 1, uniqueItems: true }),
    ['POST', 'PATCH']
  )),
  global: Type.Optional(withDefault(Type.Boolean(), false)),
  required: Type.Optional(withDefault(Type.Boolean(), true)),
  maxKeyLength: Type.Optional(withDefault(Type.Integer({ minimum: 1, maximum: 8192 }), 255)),
  scope: Type.Optional(Scope),
  fingerprint: Type.Optional(FingerprintOption),
  maxResponseSize: Type.Optional(withDefault(Type.Integer({ minimum: 0 }), 1024 * 1024)),
  releaseOnError: Type.Optional(withDefault(Type.Boolean(), false)),
  excludeHeaders: Type.Optional(withDefault(
    Type.Array(HeaderName),
    [...HOP_BY_HOP_HEADERS, 'date', 'content-length', 'set-cookie']
  )),
  problemDetails: Type.Optional(withDefault(Type.Boolean(), false)),
  wait: Type.Optional(Milliseconds(0, 0)),
  maxWaiting: Type.Optional(withDefault(Type.Integer({ minimum: 0, maximum: TIMER_MAX }), 1000))
}, { additionalProperties: false })

export type IdempotencyOptions = Static<typeof PluginOptionsSchema>
export type IdempotencyRouteOptions = Static<typeof RouteOptionsSchema>

export const validatePluginOptions = compileOptions(PluginOptionsSchema, { subject: 'plugin', prefix: '' })
export const validateRouteOptions = compileOptions(RouteOptionsSchema, { subject: 'config.idempotency', prefix: 'config.idempotency.' })
export type PluginSettings = ReturnType<typeof validatePluginOptions>

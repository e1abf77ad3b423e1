import { STATUS_CODES } from 'node:http'
import type { FastifyInstance, FastifySchema, HookHandlerDoneFunction, RouteOptions } from 'fastify'
import {
  BodyUnseenError,
  ConflictError,
  HaltedError,
  KeyInvalidError,
  KeyMissingError,
  KeyMultipleError,
  MismatchError,
  StoreUnavailableError,
  type IdempotencyError
} from './errors.js'
import type { RouteContext, RouteSettings } from './route.js'

type JsonSchema = Record<string, unknown>

// Swagger's key for a response's description: unlike `description`, it is not copied into the body schema.
const RESPONSE_DESCRIPTION = 'x-response-description'

interface TrackedRoute {
  route: RouteOptions
  settings: RouteSettings
}

/**
 * Makes the routes given to the function it returns show, in the document @fastify/swagger
 * builds, the idempotency key header and the responses the plugin can give. Called once, at
 * registration, so that its onReady hook runs before any of the app's that builds the document.
 *
 * @example
 * const documentRoute = documentRoutes(fastify, context)
 * fastify.addHook('onRoute', (route) => { documentRoute(route, routeSettings) })
 */
export function documentRoutes (fastify: FastifyInstance, context: RouteContext): (route: RouteOptions, settings: RouteSettings) => void {
  const routes: TrackedRoute[] = []
  fastify.addHook('onReady', function documentIdempotentRoutes (done: HookHandlerDoneFunction) {
    // Fastify has compiled every route's schema at preReady, before any onReady hook, and reads its
    // route options no more; @fastify/swagger reads `route.schema` from them when it builds the
    // document. A copy given now is seen by swagger only (a route-level `swaggerTransform` would
    // be too, but it would replace the app's `transform`, which type providers depend on).
    if (fastify.hasPlugin('@fastify/swagger')) {
      for (const { route, settings } of routes) {
        const schema = documentedSchema(route, settings, context)
        if (schema !== undefined) route.schema = schema
      }
    }
    routes.length = 0
    done()
  })
  return (route, settings) => { routes.push({ route, settings }) }
}

// The route's schema with the key header and the plugin's responses, or `undefined` to leave it be.
function documentedSchema (route: RouteOptions, settings: RouteSettings, context: RouteContext): FastifySchema | undefined {
  // One operation object of the document serves every method of a route: a route tracked for
  // some of its methods only is left as it is rather than documented wrongly for the others.
  const methods = Array.isArray(route.method) ? route.method : [route.method]
  if (!methods.every((method) => context.settings.methods.includes(method))) return undefined
  // A type provider's schemas (Zod and the like) are turned into JSON Schema by the app's swagger
  // `transform`, which fails on the plain JSON Schema that would sit beside them.
  const schema = route.schema as JsonSchema | undefined
  if (!isJsonSchema(schema) || !['body', 'querystring', 'params', 'headers', 'response'].every((part) => isJsonSchema(schema?.[part]))) return undefined
  const response = schema?.response as JsonSchema | undefined
  if (response !== undefined && !Object.values(response).every(isJsonSchema)) return undefined
  return {
    ...schema,
    headers: documentedHeaders(schema?.headers as JsonSchema | undefined, settings, context),
    response: documentedResponses(response, settings, context)
  }
}

function isJsonSchema (value: unknown): boolean {
  return value === undefined || (typeof value === 'object' && value !== null && Object.getPrototypeOf(value) === Object.prototype)
}

function documentedHeaders (own: JsonSchema | undefined, settings: RouteSettings, context: RouteContext): JsonSchema {
  const { header, maxKeyLength } = context.settings
  if (own !== undefined && Object.keys(own.properties ?? {}).some((name) => name.toLowerCase() === header)) return own
  const key: JsonSchema = {
    type: 'object',
    properties: {
      [header]: {
        type: 'string',
        minLength: 1,
        maxLength: maxKeyLength,
        description: `A unique key for this operation: 1 to ${maxKeyLength} visible ASCII characters, bare or as a quoted string. ` +
          'A retry with the same key and payload gets the first response again, with an `Idempotent-Replayed: true` header.'
      }
    },
    ...(settings.required ? { required: [header] } : {})
  }
  // Swagger merges the properties of `allOf` members into parameters, the last one winning: an
  // own header schema given by `$ref` keeps its own declaration of the key header, if it has one.
  return own === undefined ? key : { allOf: [key, own] }
}

function documentedResponses (own: JsonSchema | undefined, settings: RouteSettings, context: RouteContext): JsonSchema {
  // Without a response schema, swagger documents a bare 200; it would not once errors are listed.
  const responses: JsonSchema = { ...(own ?? { 200: { [RESPONSE_DESCRIPTION]: 'Default Response' } }) }
  const declared = new Set(Object.keys(responses).map((status) => status.toLowerCase()))
  for (const [status, errors] of errorsByStatus(settings, context)) {
    // A status the route documents itself (exactly or as `4xx`) keeps the route's entry: Fastify
    // serializes the plugin's errors with that schema too.
    if (declared.has(String(status)) || declared.has(`${String(status)[0]}xx`)) continue
    responses[status] = errorResponse(status, errors, context.problemDetails)
  }
  return responses
}

function errorsByStatus (settings: RouteSettings, context: RouteContext): Map<number, IdempotencyError[]> {
  const { headerLabel, settings: { maxKeyLength } } = context
  const errors = [
    ...(settings.required ? [new KeyMissingError(headerLabel)] : []),
    new KeyMultipleError(headerLabel),
    new KeyInvalidError(headerLabel, maxKeyLength),
    new ConflictError(),
    new BodyUnseenError(),
    new MismatchError(),
    new HaltedError(),
    new StoreUnavailableError()
  ]
  const byStatus = new Map<number, IdempotencyError[]>()
  for (const error of errors) byStatus.set(error.statusCode, [...(byStatus.get(error.statusCode) ?? []), error])
  return byStatus
}

// The body Fastify's default error handler sends, or the problem+json the plugin sends itself.
function errorResponse (status: number, errors: IdempotencyError[], problemDetails: boolean): JsonSchema {
  const codes = { type: 'string', enum: errors.map((error) => error.code) }
  const documented: JsonSchema = { [RESPONSE_DESCRIPTION]: errors.map((error) => `${error.message}.`).join(' ') }
  if (errors.some((error) => error.headers?.['retry-after'] !== undefined)) {
    documented.headers = { 'Retry-After': { type: 'integer', description: 'Seconds to wait before retrying' } }
  }
  if (!problemDetails) {
    return {
      ...documented,
      type: 'object',
      required: ['statusCode', 'code', 'error', 'message'],
      properties: {
        statusCode: { type: 'integer', enum: [status] },
        code: codes,
        error: { type: 'string', enum: [STATUS_CODES[status]] },
        message: { type: 'string' }
      }
    }
  }
  const problem = {
    type: 'object',
    required: ['type', 'title', 'status', 'detail', 'instance', 'code'],
    properties: {
      type: { type: 'string', enum: errors.map((error) => error.type) },
      title: { type: 'string', enum: errors.map((error) => error.title) },
      status: { type: 'integer', enum: [status] },
      detail: { type: 'string' },
      instance: { type: 'string' },
      code: codes
    }
  }
  return { ...documented, content: { 'application/problem+json': { schema: problem } } }
}

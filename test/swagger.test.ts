import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance, type InjectOptions, type RouteOptions } from 'fastify'
import swagger, { type SwaggerOptions } from '@fastify/swagger'
import idempotency, { type IdempotencyOptions } from '../lib/index.js'
import { deferred, key } from './helpers/timing.js'

interface Parameter { in: string, name: string, required?: boolean, description?: string, schema?: Record<string, unknown>, [field: string]: unknown }
interface Response { description: string, headers?: Record<string, Record<string, unknown>>, content?: Record<string, { schema: BodySchema }>, schema?: BodySchema }
interface BodySchema { required?: string[], properties?: Record<string, { enum?: unknown[] }>, [keyword: string]: unknown }
interface Operation { parameters?: Parameter[], responses: Record<string, Response> }
interface Document { paths: Record<string, Record<string, Operation>> }

const OPENAPI: SwaggerOptions = { openapi: { info: { title: 'test', version: '1.0.0' } } }
const ERROR_STATUSES = ['400', '409', '415', '422', '500', '503']
const KEY_DESCRIPTION = 'A unique key for this operation: 1 to 255 visible ASCII characters, bare or as a quoted string. ' +
  'A retry with the same key and payload gets the first response again, with an `Idempotent-Replayed: true` header.'

/** @fastify/swagger, then the plugin, then the routes; answers the ready app and its document. */
async function documented (t: Test, options: IdempotencyOptions, declare: (app: FastifyInstance) => void, swaggerOptions = OPENAPI): Promise<{ app: FastifyInstance, document: Document }> {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(swagger, swaggerOptions)
  await app.register(idempotency, options)
  declare(app)
  await app.ready()
  return { app, document: app.swagger() as unknown as Document }
}

const operation = (document: Document, path: string, method = 'post'): Operation => document.paths[path]?.[method] as Operation
const keyParameters = (found: Operation, name = 'idempotency-key'): Parameter[] => (found.parameters ?? []).filter((parameter) => parameter.name.toLowerCase() === name)

t.test('documents the key header and every response the plugin gives on a tracked route', async (t) => {
  const { app, document } = await documented(t, {}, (app) => {
    app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  })
  const found = operation(document, '/orders')
  t.same(found.parameters, [{
    in: 'header',
    name: 'idempotency-key',
    required: true,
    description: KEY_DESCRIPTION,
    schema: { type: 'string', minLength: 1, maxLength: 255 }
  }])
  t.same(Object.keys(found.responses), ['200', ...ERROR_STATUSES])
  t.same(found.responses['200'], { description: 'Default Response', content: { 'application/json': { schema: {} } } })
  const retryAfter = { 'Retry-After': { schema: { type: 'integer' }, description: 'Seconds to wait before retrying' } }
  t.same(found.responses['409']?.headers, retryAfter)
  t.same(found.responses['503']?.headers, retryAfter)
  t.equal(found.responses['400']?.headers, undefined)
  t.equal(found.responses['409']?.description, 'A request with this idempotency key is still being processed; retry later.')
  t.equal(found.responses['500']?.description, 'The original request was interrupted and its outcome is unknown.')
  t.same(found.responses['400']?.content?.['application/json']?.schema, {
    type: 'object',
    required: ['statusCode', 'code', 'error', 'message'],
    properties: {
      statusCode: { type: 'integer', enum: [400] },
      code: { type: 'string', enum: ['FST_IDEMPOTENCY_KEY_MISSING', 'FST_IDEMPOTENCY_KEY_MULTIPLE', 'FST_IDEMPOTENCY_KEY_INVALID'] },
      error: { type: 'string', enum: ['Bad Request'] },
      message: { type: 'string' }
    }
  })

  // The documented body is the one the plugin sends.
  const missing = await app.inject({ method: 'POST', url: '/orders' })
  t.equal(missing.statusCode, 400)
  t.match(missing.headers['content-type'], /^application\/json/)
  const body = missing.json()
  const schema = found.responses['400']?.content?.['application/json']?.schema as BodySchema
  t.same(Object.keys(body).sort(), [...schema.required ?? []].sort())
  t.ok(schema.properties?.code?.enum?.includes(body.code))
})

t.test('follows the header, maxKeyLength and required options', async (t) => {
  const { document } = await documented(t, { header: 'x-request-key', maxKeyLength: 64 }, (app) => {
    app.post('/optional', { config: { idempotency: { required: false } } }, async () => ({}))
    app.patch('/required', { config: { idempotency: true } }, async () => ({}))
  })
  const optional = operation(document, '/optional')
  t.same(keyParameters(optional, 'x-request-key').map(({ required, schema }) => ({ required, schema })), [
    { required: false, schema: { type: 'string', minLength: 1, maxLength: 64 } }
  ])
  t.match(keyParameters(optional, 'x-request-key')[0]?.description, /^A unique key for this operation: 1 to 64 visible ASCII characters/)
  t.same(keyParameters(optional), [])
  // Without `required`, a request without a key is not refused: 400 covers repeated and invalid keys only.
  t.same(optional.responses['400']?.content?.['application/json']?.schema?.properties?.code?.enum, ['FST_IDEMPOTENCY_KEY_MULTIPLE', 'FST_IDEMPOTENCY_KEY_INVALID'])
  t.equal(optional.responses['400']?.description, 'The X-Request-Key header must be sent once, not in several header lines. ' +
    'The X-Request-Key header must hold 1 to 64 visible ASCII characters, bare or as a quoted string.')
  t.same(keyParameters(operation(document, '/required', 'patch'), 'x-request-key').map(({ required }) => required), [true])
})

t.test('leaves routes that do not opt in, or opt out, as swagger documents them', async (t) => {
  const { document } = await documented(t, { global: true }, (app) => {
    app.post('/tracked', async () => ({}))
    app.post('/opted-out', { config: { idempotency: false } }, async () => ({}))
    app.get('/read', async () => ({}))
  })
  const untouched = { responses: { 200: { description: 'Default Response' } } }
  t.same(operation(document, '/opted-out'), untouched)
  t.same(operation(document, '/read', 'get'), untouched)
  t.equal(keyParameters(operation(document, '/tracked')).length, 1)

  const plain = await documented(t, {}, (app) => {
    app.post('/plain', async () => ({}))
  })
  t.same(operation(plain.document, '/plain'), untouched)
})

t.test('keeps the route\'s own headers and documents the key header once', async (t) => {
  const tenant = { type: 'object', properties: { 'x-tenant': { type: 'string' } }, required: ['x-tenant'] }
  const { document } = await documented(t, {}, (app) => {
    app.post('/tenant', { config: { idempotency: true }, schema: { headers: tenant } }, async () => ({}))
    app.post('/declared', {
      config: { idempotency: true },
      schema: { headers: { type: 'object', properties: { 'Idempotency-Key': { type: 'string', format: 'uuid', description: 'A UUID' } } } }
    }, async () => ({}))
    app.post('/combined', {
      config: { idempotency: true },
      schema: { headers: { allOf: [tenant, { type: 'object', properties: { 'idempotency-key': { type: 'string', description: 'Their own' } } }] } }
    }, async () => ({}))
  })
  const headers = (path: string) => operation(document, path).parameters?.map(({ name, required, description }) => ({ name, required, description }))
  t.same(headers('/tenant'), [
    { name: 'idempotency-key', required: true, description: KEY_DESCRIPTION },
    { name: 'x-tenant', required: true, description: undefined }
  ])
  t.same(headers('/declared'), [{ name: 'Idempotency-Key', required: false, description: 'A UUID' }])
  t.same(headers('/combined'), [
    { name: 'idempotency-key', required: false, description: 'Their own' },
    { name: 'x-tenant', required: true, description: undefined }
  ])
  t.same(Object.keys(operation(document, '/declared').responses), ['200', ...ERROR_STATUSES])
})

t.test('keeps the route\'s own responses, and the statuses they cover', async (t) => {
  const created = { type: 'object', properties: { id: { type: 'integer' } } }
  const response = { 201: created, 409: { description: 'Their conflict', type: 'object' }, '5xx': { type: 'object', properties: { oops: { type: 'string' } } } }
  let route: RouteOptions | undefined
  const { document } = await documented(t, {}, (app) => {
    app.addHook('onRoute', (options) => { route = options })
    app.post('/orders', { config: { idempotency: true }, schema: { response } }, async () => ({}))
  })
  const found = operation(document, '/orders')
  t.same(Object.keys(found.responses), ['201', '400', '409', '415', '422', '5XX'])
  t.same(found.responses['201'], { description: 'Default Response', content: { 'application/json': { schema: created } } })
  t.equal(found.responses['409']?.description, 'Their conflict')
  t.equal(found.responses['409']?.headers, undefined)
  // Swagger is given a copy: the schema the route was declared with is as it was.
  t.same(Object.keys(response), ['201', '409', '5xx'])
  t.not(route?.schema, undefined)
  t.equal((route?.schema as { response: unknown }).response === response, false)
})

t.test('documents problem+json bodies with problemDetails', async (t) => {
  const { app, document } = await documented(t, { problemDetails: true }, (app) => {
    app.post('/orders', { config: { idempotency: true } }, async () => ({}))
  })
  const found = operation(document, '/orders')
  t.same(Object.keys(found.responses), ['200', ...ERROR_STATUSES])
  const conflict = found.responses['409']
  t.same(Object.keys(conflict?.content ?? {}), ['application/problem+json'])
  t.same(conflict?.headers, { 'Retry-After': { schema: { type: 'integer' }, description: 'Seconds to wait before retrying' } })
  t.same(conflict?.content?.['application/problem+json']?.schema, {
    type: 'object',
    required: ['type', 'title', 'status', 'detail', 'instance', 'code'],
    properties: {
      type: { type: 'string', enum: ['tag:fastify-idempotency,2026:conflict'] },
      title: { type: 'string', enum: ['A request is outstanding for this Idempotency-Key'] },
      status: { type: 'integer', enum: [409] },
      detail: { type: 'string' },
      instance: { type: 'string' },
      code: { type: 'string', enum: ['FST_IDEMPOTENCY_CONFLICT'] }
    }
  })

  const invalid = await app.inject({ method: 'POST', url: '/orders', headers: key('not a key') })
  t.equal(invalid.statusCode, 400)
  t.match(invalid.headers['content-type'], /^application\/problem\+json/)
  const body = invalid.json()
  const schema = found.responses['400']?.content?.['application/problem+json']?.schema as BodySchema
  t.same(Object.keys(body).sort(), [...schema.required ?? []].sort())
  t.ok(schema.properties?.type?.enum?.includes(body.type))
  t.ok(schema.properties?.code?.enum?.includes(body.code))
})

t.test('documents the key header and the responses in Swagger 2 mode', async (t) => {
  const { document } = await documented(t, {}, (app) => {
    app.post('/orders', { config: { idempotency: true } }, async () => ({}))
  }, { swagger: {} })
  const found = operation(document, '/orders')
  t.same(found.parameters, [{
    in: 'header',
    name: 'idempotency-key',
    required: true,
    description: KEY_DESCRIPTION,
    type: 'string',
    minLength: 1,
    maxLength: 255
  }])
  t.same(Object.keys(found.responses), ['200', ...ERROR_STATUSES])
  t.same(found.responses['409']?.headers, { 'Retry-After': { type: 'integer', description: 'Seconds to wait before retrying' } })
  t.same(found.responses['422']?.schema?.properties?.code, { type: 'string', enum: ['FST_IDEMPOTENCY_MISMATCH'] })
})

t.test('leaves a route whose schemas are not plain JSON Schema as swagger documents it', async (t) => {
  // What a type provider's schema looks like to the plugin: an object of a class of its own.
  class ProviderSchema {
    type = 'object'
  }
  const { document } = await documented(t, {}, (app) => {
    app.post('/provided', {
      config: { idempotency: true },
      schema: { body: new ProviderSchema() },
      validatorCompiler: () => () => true
    }, async () => ({}))
    app.post('/provided-response', {
      config: { idempotency: true },
      schema: { response: { 200: new ProviderSchema() } },
      serializerCompiler: () => (data) => JSON.stringify(data)
    }, async () => ({}))
  })
  t.same(keyParameters(operation(document, '/provided')), [])
  t.same(Object.keys(operation(document, '/provided').responses), ['200'])
  t.same(keyParameters(operation(document, '/provided-response')), [])
  t.same(Object.keys(operation(document, '/provided-response').responses), ['200'])
})

t.test('leaves a route tracked for some of its methods only as swagger documents it', async (t) => {
  const { app, document } = await documented(t, {}, (app) => {
    app.route({ method: ['POST', 'PUT'], url: '/both', config: { idempotency: true }, handler: async () => ({}) })
  })
  t.same(keyParameters(operation(document, '/both', 'post')), [])
  t.same(keyParameters(operation(document, '/both', 'put')), [])
  // The route is tracked all the same, for POST.
  t.equal((await app.inject({ method: 'POST', url: '/both' })).statusCode, 400)
  t.equal((await app.inject({ method: 'PUT', url: '/both' })).statusCode, 200)
})

t.test('leaves the route options alone without @fastify/swagger', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(idempotency)
  const routes = new Map<string, RouteOptions>()
  app.addHook('onRoute', (route) => { routes.set(route.url, route) })
  const schema = { response: { 201: { type: 'object' } } }
  app.post('/bare', { config: { idempotency: true } }, async () => ({}))
  app.post('/with-schema', { config: { idempotency: true }, schema }, async () => ({}))
  await app.ready()
  t.equal(routes.get('/bare')?.schema, undefined)
  t.equal(routes.get('/with-schema')?.schema, schema)
  t.same(Object.keys(schema), ['response'])
  t.same(schema.response, { 201: { type: 'object' } })
})

interface Answer { status: number, headers: Record<string, unknown>, body: string }

/** The same routes and requests, on an app with @fastify/swagger or without it. */
async function answers (t: Test, withSwagger: boolean, problemDetails: boolean): Promise<{ answers: Answer[], runs: number, document: Document | undefined }> {
  const app = Fastify()
  t.teardown(() => app.close())
  if (withSwagger) await app.register(swagger, OPENAPI)
  await app.register(idempotency, { problemDetails })
  let runs = 0
  app.post('/orders', {
    config: { idempotency: true },
    schema: {
      body: { type: 'object', required: ['item'], properties: { item: { type: 'string' } } },
      headers: { type: 'object', properties: { 'x-tenant': { type: 'string', minLength: 2 } } },
      response: { 201: { type: 'object', properties: { id: { type: 'integer' }, item: { type: 'string' } } } }
    }
  }, async (request, reply) => {
    runs++
    // `secret` is not in the response schema: its serializer leaves it out.
    return await reply.code(201).send({ id: runs, item: (request.body as { item: string }).item, secret: 'dropped' })
  })
  const entered = deferred()
  const gate = deferred()
  app.post('/bare', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    if ((request.body as { reject?: boolean } | undefined)?.reject === true) return await reply.code(422).send({ reason: 'rejected' })
    entered.resolve()
    await gate.promise
    return { done: true }
  })
  await app.ready()

  const send = async (options: InjectOptions): Promise<Answer> => {
    const response = await app.inject(options)
    // `expires` tells when the record expires: it differs by the second the request came in.
    const { date: _date, expires, ...headers } = response.headers
    if (response.statusCode < 300) t.type(expires, 'string')
    return { status: response.statusCode, headers, body: response.body }
  }
  const order = (headers: Record<string, string>, payload: unknown = { item: 'book' }): InjectOptions => ({ method: 'POST', url: '/orders', headers, payload: payload as Record<string, unknown> })
  const result: Answer[] = []
  result.push(await send(order({})))
  result.push(await send(order(key('not a key'))))
  result.push(await send(order(key('order-1'))))
  result.push(await send(order(key('order-1'))))
  result.push(await send(order(key('order-1'), { item: 'pen' })))
  result.push(await send(order(key('order-2'), { title: 'no item' })))
  result.push(await send(order({ ...key('order-3'), 'x-tenant': 'a' })))
  // A quoted key of maxKeyLength characters is longer than maxKeyLength as a header value.
  result.push(await send(order(key(`"${'q'.repeat(255)}"`))))
  const first = send({ method: 'POST', url: '/bare', headers: key('bare-1') })
  await entered.promise
  result.push(await send({ method: 'POST', url: '/bare', headers: key('bare-1') }))
  gate.resolve()
  result.push(await first)
  result.push(await send({ method: 'POST', url: '/bare', headers: key('bare-1') }))
  result.push(await send({ method: 'POST', url: '/bare', headers: key('bare-2'), payload: { reject: true } }))
  return { answers: result, runs, document: withSwagger ? app.swagger() as unknown as Document : undefined }
}

for (const problemDetails of [false, true]) {
  t.test(`answers byte for byte as without @fastify/swagger${problemDetails ? ' with problemDetails' : ''}`, async (t) => {
    const bare = await answers(t, false, problemDetails)
    const documentedApp = await answers(t, true, problemDetails)
    t.same(documentedApp.answers, bare.answers)
    t.equal(documentedApp.runs, bare.runs)

    // What the requests met: the plugin's refusals, the route's own validation and serialization, a replay.
    t.same(bare.answers.map(({ status }) => status), [400, 400, 201, 201, 422, 400, 400, 201, 409, 200, 200, 422])
    t.equal(bare.runs, 4)
    t.equal(bare.answers[2]?.body, '{"id":1,"item":"book"}')
    t.equal(bare.answers[3]?.body, '{"id":1,"item":"book"}')
    t.equal(bare.answers[3]?.headers['idempotent-replayed'], 'true')
    t.equal(bare.answers[2]?.headers['idempotent-replayed'], undefined)
    t.equal(bare.answers[7]?.body, '{"id":2,"item":"book"}')
    t.equal(bare.answers[8]?.headers['retry-after'], '1')
    t.equal(bare.answers[10]?.headers['idempotent-replayed'], 'true')
    t.equal(bare.answers[10]?.body, '{"done":true}')
    t.equal(bare.answers[11]?.body, '{"reason":"rejected"}')
    t.match(JSON.parse(bare.answers[5]?.body ?? '{}'), { code: 'FST_ERR_VALIDATION', message: "body must have required property 'item'" })
    t.match(JSON.parse(bare.answers[6]?.body ?? '{}'), { code: 'FST_ERR_VALIDATION', message: 'headers/x-tenant must NOT have fewer than 2 characters' })
    t.match(bare.answers[0]?.headers['content-type'], problemDetails ? /^application\/problem\+json/ : /^application\/json/)

    // And the app with swagger did document the routes it answered for.
    const document = documentedApp.document as Document
    t.same(keyParameters(operation(document, '/orders')).map(({ required }) => required), [true])
    t.same(Object.keys(operation(document, '/orders').responses), ['201', ...ERROR_STATUSES])
    t.same(Object.keys(operation(document, '/bare').responses), ['200', ...ERROR_STATUSES])
  })
}

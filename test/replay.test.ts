import t from 'tap'
import type { FastifyRequest } from 'fastify'
import { ConflictError, MismatchError } from '../lib/index.js'
import { storageKey } from '../lib/key.js'
import { buildApp } from './helpers/app.js'
import { FaultyStore } from './helpers/stores.js'
import { deferred, key } from './helpers/timing.js'

t.test('runs the first request once and sets Expires to when its record expires', async (t) => {
  const app = await buildApp({ cacheTtl: 60_000 })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    return reply.code(201).send({ id: runs })
  })
  const before = Date.now()
  const response = await app.inject({ method: 'POST', url: '/orders', headers: key('first'), payload: { amount: 10 } })
  t.equal(response.statusCode, 201)
  t.same(response.json(), { id: 1 })
  t.equal(response.headers['idempotent-replayed'], undefined)
  const expires = Date.parse(response.headers.expires as string)
  t.ok(expires >= Math.floor(before / 1000) * 1000 + 60_000 && expires <= Date.now() + 60_000,
    `Expires ${response.headers.expires as string} is cacheTtl after completion`)
  t.equal(runs, 1)
  await app.close()
})

t.test('replays the stored response byte for byte without running the handler', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    reply
      .code(201)
      .header('x-order-id', `order-${runs}`)
      .header('set-cookie', 'session=secret')
      .header('connection', 'keep-alive')
      .header('link', ['</a>; rel="a"', '</b>; rel="b"'])
      .type('text/plain; charset=latin1')
    return Buffer.from([0xe9, 0x00, 0xff, 0x41])
  })
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 10 } })
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 10 } })
  t.equal(runs, 1, 'the handler ran once')
  t.equal(replay.statusCode, 201)
  t.same(replay.rawPayload, Buffer.from([0xe9, 0x00, 0xff, 0x41]))
  t.same(replay.rawPayload, first.rawPayload)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(replay.headers['x-order-id'], 'order-1')
  t.same(replay.headers.link, ['</a>; rel="a"', '</b>; rel="b"'])
  t.equal(replay.headers['content-type'], 'text/plain; charset=latin1')
  t.equal(replay.headers.expires, first.headers.expires, 'the original Expires')
  t.equal(replay.headers['content-length'], '4')
  t.equal(first.headers['set-cookie'], 'session=secret', 'the first response keeps its cookie')
  t.equal(replay.headers['set-cookie'], undefined, 'a cookie is never replayed to another client')
  await app.close()
})

t.test('replays JSON, empty and 204 responses exactly', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/json', { config: { idempotency: true } }, async () => { runs++; return { unicode: 'žluťoučký 🐎', n: 1.5 } })
  app.post('/empty', { config: { idempotency: true } }, async (request, reply) => { runs++; return reply.code(204).send() })
  app.post('/text', { config: { idempotency: true } }, async (request, reply) => { runs++; return reply.send('') })
  app.post('/large', { config: { idempotency: true } }, async () => { runs++; return { text: 'ž'.repeat(20_000) } })
  for (const url of ['/json', '/empty', '/text', '/large']) {
    const first = await app.inject({ method: 'POST', url, headers: key('k'), payload: {} })
    const replay = await app.inject({ method: 'POST', url, headers: key('k'), payload: {} })
    t.equal(replay.statusCode, first.statusCode, url)
    t.equal(replay.body, first.body, url)
    t.equal(replay.headers['content-type'], first.headers['content-type'], url)
    t.equal(replay.headers['idempotent-replayed'], 'true', url)
    t.equal(replay.headers['content-length'], first.headers['content-length'], url)
  }
  t.equal(runs, 4)
  await app.close()
})

t.test('answers 409 CONFLICT with Retry-After while the first request runs, then replays its real response', async (t) => {
  const app = await buildApp()
  const gate = deferred()
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    await gate.promise
    return reply.code(201).send({ id: 'real' })
  })
  const first = app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { a: 1 } })
  await new Promise((resolve) => setTimeout(resolve, 20))
  const conflict = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { a: 1 } })
  t.equal(conflict.statusCode, 409)
  t.equal(conflict.headers['retry-after'], '1')
  t.same(conflict.json(), {
    statusCode: 409,
    code: 'FST_IDEMPOTENCY_CONFLICT',
    error: 'Conflict',
    message: 'A request with this idempotency key is still being processed; retry later'
  })
  gate.resolve()
  t.equal((await first).statusCode, 201)
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { a: 1 } })
  t.equal(replay.statusCode, 201, 'the 409 did not overwrite the record')
  t.same(replay.json(), { id: 'real' })
  t.equal(runs, 1)
  await app.close()
})

t.test('answers 422 MISMATCH when a key is reused with another body or query, at every stage', async (t) => {
  const app = await buildApp()
  const gate = deferred()
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => {
    runs++
    await gate.promise
    return { id: 1 }
  })
  const mismatchBody = {
    statusCode: 422,
    code: 'FST_IDEMPOTENCY_MISMATCH',
    error: 'Unprocessable Entity',
    message: 'This idempotency key was already used with a different request payload'
  }
  const first = app.inject({ method: 'POST', url: '/orders?currency=eur', headers: key('k'), payload: { a: 1 } })
  await new Promise((resolve) => setTimeout(resolve, 20))
  const whileRunning = await app.inject({ method: 'POST', url: '/orders?currency=eur', headers: key('k'), payload: { a: 2 } })
  t.equal(whileRunning.statusCode, 422, 'while processing')
  t.same(whileRunning.json(), mismatchBody)
  gate.resolve()
  await first
  const otherBody = await app.inject({ method: 'POST', url: '/orders?currency=eur', headers: key('k'), payload: { a: 2 } })
  const otherQuery = await app.inject({ method: 'POST', url: '/orders?currency=usd', headers: key('k'), payload: { a: 1 } })
  t.equal(otherBody.statusCode, 422, 'other body after completion')
  t.equal(otherQuery.statusCode, 422, 'other query after completion')
  const replay = await app.inject({ method: 'POST', url: '/orders?currency=eur', headers: key('k'), payload: { a: 1 } })
  t.equal(replay.statusCode, 200, 'a 422 leaves the original record intact')
  t.same(replay.json(), { id: 1 })
  t.equal(runs, 1)
  await app.close()
})

t.test('fingerprints JSON bodies regardless of key order', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  const first = await app.inject({
    method: 'POST', url: '/orders', headers: { ...key('k'), 'content-type': 'application/json' }, payload: '{"a":1,"b":{"c":[1,2],"d":null}}'
  })
  const reordered = await app.inject({
    method: 'POST', url: '/orders', headers: { ...key('k'), 'content-type': 'application/json' }, payload: '{"b":{"d":null,"c":[1,2]},"a":1}'
  })
  const reorderedArray = await app.inject({
    method: 'POST', url: '/orders', headers: { ...key('k'), 'content-type': 'application/json' }, payload: '{"a":1,"b":{"c":[2,1],"d":null}}'
  })
  t.equal(first.statusCode, 200)
  t.equal(reordered.headers['idempotent-replayed'], 'true')
  t.equal(reorderedArray.statusCode, 422, 'array order matters')
  t.equal(runs, 1)
  await app.close()
})

t.test('a route fingerprint decides what must match when a key is reused', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/orders', {
    config: { idempotency: { fingerprint: (request: FastifyRequest) => (request.body as { amount: number }).amount } }
  }, async () => ({ runs: ++runs }))
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 5, note: 'a' } })
  const sameAmount = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 5, note: 'b' } })
  const otherAmount = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 6, note: 'a' } })
  t.equal(first.statusCode, 200)
  t.equal(sameAmount.headers['idempotent-replayed'], 'true')
  t.equal(otherAmount.statusCode, 422)
  t.equal(runs, 1)
  await app.close()
})

t.test('fingerprints buffers, dates and other body types', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (request, body, done) => { done(null, body) })
  app.post('/upload', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  app.post('/custom', {
    config: {
      idempotency: {
        fingerprint: () => ({ when: new Date(0), big: 10n, fn: () => 1, sym: Symbol('x'), nothing: undefined, list: [undefined, true] })
      }
    }
  }, async () => ({ runs: ++runs }))
  const upload = (bytes: number[]) => app.inject({
    method: 'POST', url: '/upload', headers: { ...key('k'), 'content-type': 'application/octet-stream' }, payload: Buffer.from(bytes)
  })
  t.equal((await upload([0, 1, 2])).statusCode, 200)
  t.equal((await upload([0, 1, 2])).headers['idempotent-replayed'], 'true')
  t.equal((await upload([0, 1, 3])).statusCode, 422)
  const custom = () => app.inject({ method: 'POST', url: '/custom', headers: key('k'), payload: {} })
  t.equal((await custom()).statusCode, 200)
  t.equal((await custom()).headers['idempotent-replayed'], 'true')
  t.equal(runs, 2)
  await app.close()
})

t.test('fingerprints large bodies', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/bulk', { config: { idempotency: true }, bodyLimit: 10 * 1024 * 1024 }, async () => ({ runs: ++runs }))
  const items = Array.from({ length: 5000 }, (_, index) => ({ id: index, name: `item ${index}` }))
  const send = (list: unknown[]) => app.inject({ method: 'POST', url: '/bulk', headers: key('k'), payload: { items: list } })
  t.equal((await send(items)).statusCode, 200)
  t.equal((await send(items)).headers['idempotent-replayed'], 'true')
  t.equal((await send([...items.slice(0, -1), { id: 4999, name: 'changed' }])).statusCode, 422)
  t.equal(runs, 1)
  await app.close()
})

t.test('the same key on another path or method is an independent request', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.route({ method: ['POST', 'PATCH'], url: '/orders/:id', config: { idempotency: true }, handler: async () => ({ runs: ++runs }) })
  const send = (method: 'POST' | 'PATCH', url: string) => app.inject({ method, url, headers: key('k'), payload: {} })
  t.same((await send('POST', '/orders/1')).json(), { runs: 1 })
  t.same((await send('POST', '/orders/2')).json(), { runs: 2 }, 'another path')
  t.same((await send('PATCH', '/orders/1')).json(), { runs: 3 }, 'another method')
  t.same((await send('POST', '/orders/1')).json(), { runs: 1 }, 'the first is replayed')
  await app.close()
})

t.test('keys of different scopes never meet; the scope can read what route hooks set', async (t) => {
  const app = await buildApp({ scope: async (request) => (request as FastifyRequest & { user: string }).user })
  let runs = 0
  app.decorateRequest('user', '')
  app.post('/orders', {
    config: { idempotency: true },
    preHandler: async (request) => { (request as FastifyRequest & { user: string }).user = request.headers['x-user'] as string }
  }, async (request) => ({ runs: ++runs, user: (request as FastifyRequest & { user: string }).user }))
  const send = (user: string) => app.inject({ method: 'POST', url: '/orders', headers: { ...key('k'), 'x-user': user }, payload: {} })
  t.same((await send('alice')).json(), { runs: 1, user: 'alice' })
  t.same((await send('bob')).json(), { runs: 2, user: 'bob' }, 'bob does not see alice\'s response')
  const replay = await send('alice')
  t.same(replay.json(), { runs: 1, user: 'alice' })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  await app.close()
})

t.test('a synchronous scope separates keys too', async (t) => {
  const app = await buildApp({ scope: (request) => request.headers['x-tenant'] as string })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  const send = (tenant: string) => app.inject({ method: 'POST', url: '/orders', headers: { ...key('k'), 'x-tenant': tenant }, payload: {} })
  t.same((await send('acme')).json(), { runs: 1 })
  t.same((await send('globex')).json(), { runs: 2 })
  t.same((await send('acme')).json(), { runs: 1 })
  await app.close()
})

t.test('a scope that returns no string fails the request without running the handler', async (t) => {
  const app = await buildApp({ scope: () => undefined as unknown as string })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  const response = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(response.statusCode, 500)
  t.equal(response.json().message, 'the idempotency scope function must return a string')
  t.equal(runs, 0)
  await app.close()
})

t.test('stores nothing when schema validation fails, so a retry with a fixed body runs', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/orders', {
    config: { idempotency: true },
    schema: { body: { type: 'object', required: ['amount'], properties: { amount: { type: 'integer' } } } }
  }, async (request, reply) => reply.code(201).send({ runs: ++runs }))
  const invalid = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 'ten' } })
  t.equal(invalid.statusCode, 400)
  t.equal(invalid.json().code, 'FST_ERR_VALIDATION')
  const fixed = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 10 } })
  t.equal(fixed.statusCode, 201)
  t.same(fixed.json(), { runs: 1 })
  t.equal(runs, 1)
  await app.close()
})

t.test('stores and replays an error response with a 4xx status', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => {
    runs++
    throw Object.assign(new Error('card declined'), { statusCode: 402, code: 'CARD_DECLINED' })
  })
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(first.statusCode, 402)
  t.same(first.json(), { statusCode: 402, code: 'CARD_DECLINED', error: 'Payment Required', message: 'card declined' })
  t.equal(replay.statusCode, 402)
  t.equal(replay.body, first.body)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(runs, 1)
  await app.close()
})

t.test('lets the app error handler shape the plugin errors, which carry problem fields', async (t) => {
  const app = await buildApp()
  const gate = deferred()
  app.setErrorHandler((error, request, reply) => {
    const problem = error as InstanceType<typeof ConflictError>
    return reply.code(problem.statusCode).send({
      mine: true,
      conflict: error instanceof ConflictError,
      mismatch: error instanceof MismatchError,
      type: problem.type,
      title: problem.title,
      detail: problem.detail
    })
  })
  app.post('/orders', { config: { idempotency: true } }, async () => { await gate.promise; return {} })
  const first = app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  await new Promise((resolve) => setTimeout(resolve, 20))
  const conflict = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(conflict.statusCode, 409)
  t.equal(conflict.headers['retry-after'], '1')
  t.same(conflict.json(), {
    mine: true,
    conflict: true,
    mismatch: false,
    type: 'tag:fastify-idempotency,2026:conflict',
    title: 'A request is outstanding for this Idempotency-Key',
    detail: 'A request with this idempotency key is still being processed; retry later'
  })
  gate.resolve()
  await first
  await app.close()
})

t.test('answers its own errors as application/problem+json with problemDetails', async (t) => {
  const app = await buildApp({ problemDetails: true })
  const gate = deferred()
  app.post('/orders', { config: { idempotency: true } }, async () => { await gate.promise; return {} })
  const missing = await app.inject({ method: 'POST', url: '/orders?x=1', payload: {} })
  t.equal(missing.statusCode, 400)
  t.match(missing.headers['content-type'], /^application\/problem\+json/)
  t.same(missing.json(), {
    type: 'tag:fastify-idempotency,2026:key-missing',
    title: 'Idempotency-Key is missing',
    status: 400,
    detail: 'The Idempotency-Key header is required for this operation',
    instance: '/orders',
    code: 'FST_IDEMPOTENCY_KEY_MISSING'
  })
  const first = app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  await new Promise((resolve) => setTimeout(resolve, 20))
  const conflict = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(conflict.statusCode, 409)
  t.equal(conflict.headers['retry-after'], '1')
  t.same(conflict.json(), {
    type: 'tag:fastify-idempotency,2026:conflict',
    title: 'A request is outstanding for this Idempotency-Key',
    status: 409,
    detail: 'A request with this idempotency key is still being processed; retry later',
    instance: '/orders',
    code: 'FST_IDEMPOTENCY_CONFLICT'
  })
  gate.resolve()
  await first
  await app.close()
})

t.test('answers problem+json when the store answers with promises too', async (t) => {
  const app = await buildApp({ problemDetails: true, store: new FaultyStore() })
  app.post('/orders', { config: { idempotency: true } }, async (request) => request.body)
  t.equal((await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { a: 1 } })).statusCode, 200)
  const mismatch = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { a: 2 } })
  t.equal(mismatch.statusCode, 422)
  t.match(mismatch.headers['content-type'], /^application\/problem\+json/)
  t.equal(mismatch.json().code, 'FST_IDEMPOTENCY_MISMATCH')
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { a: 1 } })
  t.same(replay.json(), { a: 1 })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  await app.close()
})

t.test('problemDetails leaves errors that are not the plugin\'s to the error handler', async (t) => {
  const app = await buildApp({ problemDetails: true, scope: () => { throw new Error('no user') } })
  app.post('/orders', { config: { idempotency: true } }, async () => ({}))
  const response = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(response.statusCode, 500)
  t.match(response.headers['content-type'], /^application\/json/)
  t.equal(response.json().message, 'no user')
  await app.close()
})

t.test('route cacheTtl overrides the plugin\'s', async (t) => {
  const app = await buildApp({ cacheTtl: 60_000 })
  app.post('/short', { config: { idempotency: { cacheTtl: 5_000 } } }, async () => ({}))
  const response = await app.inject({ method: 'POST', url: '/short', headers: key('k'), payload: {} })
  const expires = Date.parse(response.headers.expires as string)
  t.ok(expires <= Date.now() + 5_000 && expires > Date.now() + 3_000, `Expires ${response.headers.expires as string}`)
  await app.close()
})

t.test('a record expires after cacheTtl and the key can then be used again', async (t) => {
  const app = await buildApp({ cacheTtl: 50 })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  t.same((await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })).json(), { runs: 1 })
  t.same((await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })).json(), { runs: 1 })
  await new Promise((resolve) => setTimeout(resolve, 80))
  t.same((await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { other: true } })).json(), { runs: 2 })
  await app.close()
})

t.test('leaves GET, HEAD and untracked methods alone', async (t) => {
  const app = await buildApp({ global: true })
  let runs = 0
  app.get('/orders', async () => ({ runs: ++runs }))
  app.put('/orders', async () => ({ runs: ++runs }))
  app.delete('/orders', async () => ({ runs: ++runs }))
  t.equal((await app.inject({ method: 'GET', url: '/orders' })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/orders', headers: key('k') })).statusCode, 200)
  t.equal((await app.inject({ method: 'HEAD', url: '/orders' })).statusCode, 200)
  t.equal((await app.inject({ method: 'PUT', url: '/orders', headers: key('k'), payload: {} })).statusCode, 200)
  const again = await app.inject({ method: 'PUT', url: '/orders', headers: key('k'), payload: {} })
  t.equal(again.headers['idempotent-replayed'], undefined)
  t.equal((await app.inject({ method: 'DELETE', url: '/orders' })).statusCode, 200)
  t.equal(runs, 6)
  await app.close()
})

t.test('on a route with tracked and untracked methods only the tracked ones need a key', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.route({ method: ['GET', 'POST'], url: '/mixed', config: { idempotency: true }, handler: async () => ({ runs: ++runs }) })
  t.equal((await app.inject({ method: 'GET', url: '/mixed' })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/mixed', payload: {} })).statusCode, 400)
  t.equal((await app.inject({ method: 'POST', url: '/mixed', headers: key('k'), payload: {} })).statusCode, 200)
  t.equal(runs, 2)
  await app.close()
})

t.test('keeps the route\'s own hooks and runs them first', async (t) => {
  const app = await buildApp()
  const order: string[] = []
  app.post('/orders', {
    config: { idempotency: true },
    onRequest: async () => { order.push('onRequest') },
    preHandler: [async () => { order.push('preHandler') }],
    onSend: [async (request, reply, payload) => { order.push('onSend'); return payload }],
    onError: async () => { order.push('onError') }
  }, async () => { order.push('handler'); return {} })
  t.equal((await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })).statusCode, 200)
  t.same(order, ['onRequest', 'preHandler', 'handler', 'onSend'])
  await app.close()
})

t.test('each record keeps the headers its own handler set', async (t) => {
  const app = await buildApp()
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    return reply.header('x-kind', (request.body as { kind: string }).kind).send({ ok: true })
  })
  const headersOf = async (clientKey: string, kind: string) => {
    const response = await app.inject({ method: 'POST', url: '/orders', headers: key(clientKey), payload: { kind } })
    t.equal(response.statusCode, 200)
    const record = await app.idempotency.store.lookup(storageKey({ method: 'POST', route: '/orders', key: clientKey }, true))
    const { expires, ...headers } = record?.response?.headers ?? {}
    t.equal(expires, response.headers.expires, 'Expires is stored as it was sent')
    return headers
  }
  t.same(await headersOf('one', 'same'), { 'content-type': 'application/json; charset=utf-8', 'x-kind': 'same' })
  t.same(await headersOf('two', 'same'), { 'content-type': 'application/json; charset=utf-8', 'x-kind': 'same' })
  t.same(await headersOf('three', 'other'), { 'content-type': 'application/json; charset=utf-8', 'x-kind': 'other' })
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('two'), payload: { kind: 'same' } })
  t.equal(replay.headers['x-kind'], 'same')
  await app.close()
})

t.test('stores and replays the response of a handler that returns the reply and sends it later', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/later', { config: { idempotency: true } }, (request, reply) => {
    runs++
    setTimeout(() => { reply.code(201).send({ run: runs }) }, 5)
    return reply
  })
  const first = await app.inject({ method: 'POST', url: '/later', headers: key('later'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/later', headers: key('later'), payload: {} })
  t.equal(first.statusCode, 201)
  t.same(first.json(), { run: 1 })
  t.equal(replay.statusCode, 201)
  t.equal(replay.body, first.body)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(runs, 1)
  await app.close()
})

import { Readable } from 'node:stream'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import Fastify, { type FastifyReply, type FastifyRequest } from 'fastify'
import idempotency from '../lib/index.js'
import { buildApp } from './helpers/app.js'
import { abandonRequest } from './helpers/http.js'
import { deferred, key, sleep } from './helpers/timing.js'

t.test('a request running longer than cacheTtl keeps its record: a retry gets 409, not a second run', async (t) => {
  const app = await buildApp({ cacheTtl: 50, processingTtl: 30 })
  let runs = 0
  app.post('/slow', { config: { idempotency: true } }, async () => { runs++; await sleep(200); return { done: true } })
  const first = app.inject({ method: 'POST', url: '/slow', headers: key('k'), payload: {} })
  await sleep(120)
  t.equal((await app.inject({ method: 'POST', url: '/slow', headers: key('k'), payload: {} })).statusCode, 409)
  t.equal((await first).statusCode, 200)
  t.equal(runs, 1)
  await app.close()
})

t.test('a handler timeout answering while the handler runs halts the record, even with releaseOnError', async (t) => {
  const app = Fastify({ handlerTimeout: 50 })
  await app.register(idempotency, { releaseOnError: true })
  let runs = 0
  app.post('/slow', { config: { idempotency: true } }, async () => { runs++; await sleep(150); return { done: true } })
  const first = await app.inject({ method: 'POST', url: '/slow', headers: key('k'), payload: {} })
  t.equal(first.statusCode, 503)
  const retry = await app.inject({ method: 'POST', url: '/slow', headers: key('k'), payload: {} })
  t.equal(retry.statusCode, 500)
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 1, 'never a second run while the first may still be working')
  await sleep(150)
  await app.close()
})

t.test('a hook that answers before the handler leaves the key free: tracking runs in the handler\'s place', async (t) => {
  const app = Fastify()
  await app.register(idempotency)
  // like a rate limiter registered after this plugin: its preHandler is the route's last hook
  let limited = true
  app.addHook('onRoute', (options) => {
    const hooks = Array.isArray(options.preHandler) ? options.preHandler : options.preHandler === undefined ? [] : [options.preHandler]
    options.preHandler = [...hooks, async (request, reply) => { if (limited) return await reply.code(429).send({ limited: true }) }]
  })
  let runs = 0
  app.post('/pay', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  const refused = await app.inject({ method: 'POST', url: '/pay', headers: key('k'), payload: {} })
  t.equal(refused.statusCode, 429)
  limited = false
  const retry = await app.inject({ method: 'POST', url: '/pay', headers: key('k'), payload: {} })
  t.equal(retry.statusCode, 200, 'the 429 was not stored')
  t.same(retry.json(), { runs: 1 })
  await app.close()
})

t.test('replays the stored bytes even when an app onSend hook transforms payloads', async (t) => {
  const app = Fastify()
  await app.register(idempotency)
  app.addHook('onSend', async (request, reply, payload) => typeof payload === 'string' ? `{"data":${payload}}` : payload)
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ id: ++runs }))
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(first.body, '{"data":{"id":1}}')
  t.equal(replay.body, '{"data":{"id":1}}', 'not wrapped twice')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  await app.close()
})

t.test('replays no content-type where the original had none', async (t) => {
  const app = await buildApp()
  app.post('/raw', { config: { idempotency: true } }, async (request, reply) => {
    reply.removeHeader('content-type')
    return reply.send(Readable.from([Buffer.from('bytes')]))
  })
  const first = await app.inject({ method: 'POST', url: '/raw', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/raw', headers: key('k'), payload: {} })
  t.equal(first.headers['content-type'], undefined)
  t.equal(replay.headers['content-type'], undefined)
  t.equal(replay.body, 'bytes')
  await app.close()
})

t.test('does not store headers the app set before the handler ran', async (t) => {
  const app = Fastify()
  await app.register(idempotency)
  app.addHook('onRequest', async (request, reply) => {
    reply.header('access-control-allow-origin', request.headers.origin as string)
    reply.header('x-request-id', request.id)
  })
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => reply.header('x-order', '1').send({ ok: true }))
  await app.inject({ method: 'POST', url: '/orders', headers: { ...key('k'), origin: 'https://a.example' }, payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: { ...key('k'), origin: 'https://b.example' }, payload: {} })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(replay.headers['access-control-allow-origin'], 'https://b.example', 'this request\'s CORS header')
  t.equal(replay.headers['x-request-id'], 'req-2', 'this request\'s id')
  t.equal(replay.headers['x-order'], '1', 'the handler\'s header')
  await app.close()
})

t.test('one route, one record: trailing slash, case and percent-encoding do not make new keys', async (t) => {
  const app = Fastify({ routerOptions: { ignoreTrailingSlash: true, caseSensitive: false } })
  await app.register(idempotency)
  let runs = 0
  app.post('/orders/:id', { config: { idempotency: true } }, async (request) => ({ runs: ++runs, id: (request.params as { id: string }).id }))
  for (const url of ['/orders/a', '/orders/a/', '/ORDERS/a', '/orders/%61']) {
    const response = await app.inject({ method: 'POST', url, headers: key('k'), payload: {} })
    t.same(response.json(), { runs: 1, id: 'a' }, url)
  }
  t.same((await app.inject({ method: 'POST', url: '/orders/b', headers: key('k'), payload: {} })).json(), { runs: 2, id: 'b' })
  await app.close()
})

t.test('an async fingerprint is awaited', async (t) => {
  const app = await buildApp({ fingerprint: async (request: FastifyRequest) => (request.body as { amount: number }).amount })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 1 } })
  const other = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: { amount: 1000 } })
  t.equal(other.statusCode, 422)
  t.equal(runs, 1)
  await app.close()
})

t.test('a response body that cannot be stored halts the record even with releaseOnError', async (t) => {
  const app = Fastify()
  // An onSend hook that runs before the plugin's (added before it registered) turns the payload
  // into something that is neither bytes nor a stream.
  app.addHook('onSend', async (request, reply, payload) => request.headers['x-first'] === '1' ? 42 : payload)
  await app.register(idempotency, { releaseOnError: true })
  let runs = 0
  app.post('/odd', { config: { idempotency: true } }, async () => { runs++; return 'x' })
  await app.inject({ method: 'POST', url: '/odd', headers: { ...key('k'), 'x-first': '1' }, payload: {} })
  const retry = await app.inject({ method: 'POST', url: '/odd', headers: key('k'), payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 1)
  await app.close()
})

t.test('a route onSend hook that breaks the response after the handler completed leaves the handler\'s response stored for the retry', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/odd', {
    config: { idempotency: true },
    onSend: async (request, reply, payload) => request.headers['x-first'] === '1' ? 42 : payload
  }, async (request, reply) => { runs++; return reply.code(201).send('done') })
  const first = await app.inject({ method: 'POST', url: '/odd', headers: { ...key('k'), 'x-first': '1' }, payload: {} })
  t.equal(first.statusCode, 500, 'Fastify refuses what the hook made of the payload')
  const retry = await app.inject({ method: 'POST', url: '/odd', headers: key('k'), payload: {} })
  t.equal(retry.statusCode, 201, 'the handler did its work: the retry learns its outcome')
  t.equal(retry.body, 'done')
  t.equal(retry.headers['idempotent-replayed'], 'true')
  t.equal(runs, 1)
  await app.close()
})

t.test('a response that cannot be read halts the record and fails the request', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/used', { config: { idempotency: true } }, async () => {
    runs++
    const response = new Response('once')
    await response.text()
    return response
  })
  const first = await app.inject({ method: 'POST', url: '/used', headers: key('k'), payload: {} })
  t.equal(first.statusCode, 500)
  const retry = await app.inject({ method: 'POST', url: '/used', headers: key('k'), payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED', 'not left running')
  t.equal(runs, 1)
  await app.close()
})

t.test('a client that goes away during a streamed response leaves the record halted, never released', async (t) => {
  const app = await buildApp({ releaseOnError: true })
  const started = deferred()
  let runs = 0
  app.post('/stream', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    let sent = 0
    return reply.type('text/plain').send(new Readable({
      read () {
        if (sent++ === 0) {
          this.push('first chunk')
          started.resolve()
        } else {
          setTimeout(() => this.push('more'), 20)
        }
      }
    }))
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as AddressInfo
  const request = 'POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nIdempotency-Key: cut\r\nContent-Length: 2\r\n\r\n{}'
  await abandonRequest(port, request, started.promise)
  await sleep(100)
  const retry = await app.inject({ method: 'POST', url: '/stream', headers: { 'idempotency-key': 'cut' }, payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 1)
  await app.close()
})

t.test('a synchronous handler is tracked like an async one', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/sync', { config: { idempotency: true } }, function (request, reply) {
    runs++
    reply.code(201).send({ runs })
  })
  app.post('/sync-reply', { config: { idempotency: { releaseOnError: true } } }, function (request, reply) {
    runs++
    return reply.code(503).send({ unavailable: true })
  })
  app.post('/sync-throw', { config: { idempotency: true } }, function () {
    runs++
    throw new Error('sync failure')
  })
  await app.inject({ method: 'POST', url: '/sync', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/sync', headers: key('k'), payload: {} })
  t.equal(replay.statusCode, 201)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal((await app.inject({ method: 'POST', url: '/sync-reply', headers: key('k'), payload: {} })).statusCode, 503)
  t.equal((await app.inject({ method: 'POST', url: '/sync-reply', headers: key('k'), payload: {} })).statusCode, 503,
    'a handler that returned its reply is done: with releaseOnError its 5xx frees the key')
  t.equal((await app.inject({ method: 'POST', url: '/sync-throw', headers: key('k'), payload: {} })).statusCode, 500)
  t.equal((await app.inject({ method: 'POST', url: '/sync-throw', headers: key('k'), payload: {} })).json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 4)
  await app.close()
})

t.test('a stale owner that fails after its key was taken over leaves the new record alone', async (t) => {
  const { MemoryStore } = await import('../lib/index.js')
  const { logCollector } = await import('./helpers/logs.js')
  const store = new MemoryStore()
  const logs = logCollector()
  const dying = Fastify({ logger: { level: 'warn', stream: logs.stream } })
  await dying.register(idempotency, { store, processingTtl: 30, releaseOnError: true })
  const survivor = await buildApp({ store, processingTtl: 30, releaseOnError: true })
  const gate = deferred()
  dying.post('/orders', { config: { idempotency: true } }, async () => { await gate.promise; throw new Error('too late') })
  survivor.post('/orders', { config: { idempotency: true } }, async () => ({ by: 'survivor' }))
  const orphan = dying.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  await sleep(10)
  dying.idempotency.close()
  await sleep(50)
  t.same((await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })).json(), { by: 'survivor' })
  gate.resolve()
  t.equal((await orphan).statusCode, 500)
  t.ok(logs.find(40, 'taken over before it was settled'))
  const replay = await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.same(replay.json(), { by: 'survivor' })
  await dying.close()
  await survivor.close()
})

t.test('a response sent around reply.send (as a plugin calling Fastify\'s own send may) still stores the headers the handler set', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/direct', { config: { idempotency: true } }, (request, reply) => {
    runs++
    reply.header('x-order', 'o1').code(201)
    ;(Object.getPrototypeOf(reply) as FastifyReply).send.call(reply, 'made')
    return reply
  })
  const first = await app.inject({ method: 'POST', url: '/direct', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/direct', headers: key('k'), payload: {} })
  t.equal(first.statusCode, 201)
  t.equal(replay.statusCode, 201)
  t.equal(replay.body, 'made')
  t.equal(replay.headers['x-order'], 'o1')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(runs, 1)
  await app.close()
})

import { Readable } from 'node:stream'
import t from 'tap'
import Fastify, { type FastifyReply, type FastifyRequest } from 'fastify'
import idempotency, { MemoryStore } from '../lib/index.js'
import { buildApp } from './helpers/app.js'
import { logCollector } from './helpers/logs.js'
import { FaultyStore } from './helpers/stores.js'
import { deferred, key } from './helpers/timing.js'

const halted = {
  statusCode: 500,
  code: 'FST_IDEMPOTENCY_HALTED',
  error: 'Internal Server Error',
  message: 'The original request was interrupted and its outcome is unknown'
}

t.test('halts the record when the handler fails with a 5xx or status-less error', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/unavailable', { config: { idempotency: true } }, async () => {
    runs++
    throw Object.assign(new Error('upstream down'), { statusCode: 502 })
  })
  app.post('/crash', { config: { idempotency: true } }, async () => {
    runs++
    throw new Error('boom')
  })
  app.post('/sent-500', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    return reply.code(500).send({ failed: true })
  })
  for (const [url, status] of [['/unavailable', 502], ['/crash', 500], ['/sent-500', 500]] as const) {
    const first = await app.inject({ method: 'POST', url, headers: key('k'), payload: {} })
    t.equal(first.statusCode, status, `${url}: the client gets the handler's failure`)
    const retry = await app.inject({ method: 'POST', url, headers: key('k'), payload: {} })
    t.equal(retry.statusCode, 500, `${url}: the retry is told the outcome is unknown`)
    t.same(retry.json(), halted)
    const mismatch = await app.inject({ method: 'POST', url, headers: key('k'), payload: { other: 1 } })
    t.equal(mismatch.statusCode, 422, `${url}: a halted record still checks the fingerprint`)
  }
  t.equal(runs, 3, 'each handler ran once')
  await app.close()
})

t.test('with releaseOnError a 5xx deletes the record so a retry runs the handler again', async (t) => {
  const app = await buildApp({ releaseOnError: true })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => {
    runs++
    if (runs === 1) throw new Error('transient')
    return { attempt: runs }
  })
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(first.statusCode, 500)
  const retry = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(retry.statusCode, 200)
  t.same(retry.json(), { attempt: 2 })
  const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.same(replay.json(), { attempt: 2 })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(runs, 2)
  await app.close()
})

t.test('releaseOnError can be set per route', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/orders', { config: { idempotency: { releaseOnError: true } } }, async () => {
    runs++
    throw new Error('transient')
  })
  await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(runs, 2)
  await app.close()
})

t.test('stores a streamed response as it is sent and replays it', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/report', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    reply.type('text/csv')
    return Readable.from([Buffer.from('a,b\n'), Buffer.from('1,2\n'), Buffer.from([0xff, 0x00])])
  })
  app.post('/web', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    reply.type('text/plain')
    return new ReadableStream({
      start (controller) {
        controller.enqueue(new TextEncoder().encode('web '))
        controller.enqueue(new TextEncoder().encode('stream'))
        controller.close()
      }
    })
  })
  const first = await app.inject({ method: 'POST', url: '/report', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/report', headers: key('k'), payload: {} })
  t.same(first.rawPayload, Buffer.concat([Buffer.from('a,b\n1,2\n'), Buffer.from([0xff, 0x00])]))
  t.same(replay.rawPayload, first.rawPayload)
  t.equal(replay.headers['content-type'], 'text/csv')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  const web = await app.inject({ method: 'POST', url: '/web', headers: key('k'), payload: {} })
  const webReplay = await app.inject({ method: 'POST', url: '/web', headers: key('k'), payload: {} })
  t.equal(web.body, 'web stream')
  t.equal(webReplay.body, 'web stream')
  t.equal(webReplay.headers['idempotent-replayed'], 'true')
  t.equal(runs, 2)
  await app.close()
})

for (const releaseOnError of [false, true]) {
  t.test(`${releaseOnError ? 'with releaseOnError releases' : 'halts'} the record when the response stream fails by itself`, async (t) => {
    const app = await buildApp({ releaseOnError })
    let runs = 0
    app.post('/report', { config: { idempotency: true } }, async (request, reply) => {
      runs++
      return reply.type('text/plain').send(new Readable({
        read () {
          this.push('partial')
          this.destroy(new Error('disk gone'))
        }
      }))
    })
    await app.inject({ method: 'POST', url: '/report', headers: key('k'), payload: {} }).catch(() => undefined)
    // the stream's failure is settled asynchronously after the client saw the broken response
    await new Promise((resolve) => setTimeout(resolve, 20))
    const retry = await app.inject({ method: 'POST', url: '/report', headers: key('k'), payload: {} }).catch(() => undefined)
    if (releaseOnError) {
      t.equal(runs, 2, 'the retry ran the handler: the record was released')
    } else {
      t.equal(retry?.statusCode, 500)
      t.same(retry?.json(), halted)
      t.equal(runs, 1)
    }
    await app.close()
  })
}

t.test('does not store a body larger than maxResponseSize: the record is halted with a warning', async (t) => {
  const logs = logCollector()
  const app = Fastify({ logger: { level: 'warn', stream: logs.stream } })
  await app.register(idempotency, { maxResponseSize: 10 })
  let runs = 0
  app.post('/big', { config: { idempotency: true } }, async () => { runs++; return 'x'.repeat(11) })
  app.post('/big-stream', { config: { idempotency: true } }, async () => { runs++; return Readable.from(['12345', '67890', 'x']) })
  app.post('/fits', { config: { idempotency: { maxResponseSize: 100 } } }, async () => { runs++; return 'x'.repeat(11) })
  for (const url of ['/big', '/big-stream']) {
    const first = await app.inject({ method: 'POST', url, headers: key('k'), payload: {} })
    t.equal(first.statusCode, 200, `${url}: the client still gets the whole response`)
    t.equal(first.body.length, 11)
    const retry = await app.inject({ method: 'POST', url, headers: key('k'), payload: {} })
    t.same(retry.json(), halted, url)
  }
  const warning = logs.find(40, 'larger than maxResponseSize')
  t.ok(warning, 'a warning is logged')
  t.equal(warning?.size, 11)
  t.equal(warning?.maxResponseSize, 10)
  await app.inject({ method: 'POST', url: '/fits', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/fits', headers: key('k'), payload: {} })
  t.equal(replay.headers['idempotent-replayed'], 'true', 'a route can raise the limit')
  t.equal(runs, 3)
  await app.close()
})

t.test('treats a record whose lease lapsed as halted: its instance died', async (t) => {
  const store = new MemoryStore()
  const dying = await buildApp({ store, processingTtl: 30 })
  const survivor = await buildApp({ store, processingTtl: 30 })
  const gate = deferred()
  let runs = 0
  for (const app of [dying, survivor]) {
    app.post('/orders', { config: { idempotency: true } }, async () => { runs++; await gate.promise; return {} })
  }
  const orphan = dying.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  await new Promise((resolve) => setTimeout(resolve, 10))
  const conflict = await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(conflict.statusCode, 409, 'while the lease is renewed the request is running')
  await new Promise((resolve) => setTimeout(resolve, 60))
  const stillRunning = await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(stillRunning.statusCode, 409, 'the lease is renewed past processingTtl while the handler runs')
  dying.idempotency.close() // the instance stops renewing, as if it died
  await new Promise((resolve) => setTimeout(resolve, 60))
  const retry = await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(retry.statusCode, 500)
  t.same(retry.json(), halted)
  t.equal(runs, 1)
  gate.resolve()
  await orphan
  const late = await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(late.statusCode, 200, 'the owner could still complete: its key was never taken over')
  await dying.close()
  await survivor.close()
})

t.test('with releaseOnError a lapsed lease is taken over and the stale owner cannot overwrite the result', async (t) => {
  const logs = logCollector()
  const store = new MemoryStore()
  const dying = Fastify({ logger: { level: 'warn', stream: logs.stream } })
  await dying.register(idempotency, { store, processingTtl: 30, releaseOnError: true })
  const survivor = await buildApp({ store, processingTtl: 30, releaseOnError: true })
  const gate = deferred()
  let runs = 0
  dying.post('/orders', { config: { idempotency: true } }, async () => { runs++; await gate.promise; return { by: 'dying' } })
  survivor.post('/orders', { config: { idempotency: true } }, async () => { runs++; return { by: 'survivor' } })
  const orphan = dying.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  await new Promise((resolve) => setTimeout(resolve, 10))
  dying.idempotency.close()
  await new Promise((resolve) => setTimeout(resolve, 50))
  const takeover = await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.same(takeover.json(), { by: 'survivor' })
  gate.resolve()
  t.same((await orphan).json(), { by: 'dying' }, 'the stale owner\'s client still gets its response')
  const replay = await survivor.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.same(replay.json(), { by: 'survivor' }, 'the stale owner did not overwrite the record')
  t.ok(logs.find(40, 'taken over'), 'the stale owner logs that its response was not stored')
  t.equal(runs, 2)
  await dying.close()
  await survivor.close()
})

for (const throws of [false, true]) {
  const failure = throws ? 'throws' : 'rejects'

  t.test(`answers 503 STORE_UNAVAILABLE with Retry-After when the store ${failure} while tracking`, async (t) => {
    const store = new FaultyStore(undefined, { throws })
    const logs = logCollector()
    const app = Fastify({ logger: { level: 'error', stream: logs.stream } })
    await app.register(idempotency, { store })
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
    store.failing.add('insert')
    const failed = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
    t.equal(failed.statusCode, 503)
    t.equal(failed.headers['retry-after'], '5')
    t.same(failed.json(), {
      statusCode: 503,
      code: 'FST_IDEMPOTENCY_STORE_UNAVAILABLE',
      error: 'Service Unavailable',
      message: 'The idempotency store could not be reached; the request was not processed, retry later'
    })
    t.ok(logs.find(50, 'failed while tracking'), 'the cause is logged')
    if (!throws) {
      store.failAfter = 50
      const started = Date.now()
      const slow = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
      t.equal(slow.statusCode, 503, 'a store that gives up after its timeout')
      t.ok(Date.now() - started < 1000)
    }
    t.equal(runs, 0, 'the handler never ran')
    store.failing.clear()
    const recovered = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
    t.equal(recovered.statusCode, 200, 'the store is back: the request runs')
    t.equal(runs, 1)
    await app.close()
  })

  t.test(`gives the client its response when the store ${failure} while saving it, and logs the failure`, async (t) => {
    const store = new FaultyStore(undefined, { throws })
    const logs = logCollector()
    const app = Fastify({ logger: { level: 'error', stream: logs.stream } })
    await app.register(idempotency, { store, processingTtl: 20 })
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => reply.code(201).send({ runs: ++runs }))
    app.post('/failing', { config: { idempotency: true } }, async () => { runs++; throw new Error('boom') })
    store.failing.add('update')
    const response = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
    t.equal(response.statusCode, 201)
    t.same(response.json(), { runs: 1 })
    t.ok(logs.find(50, 'failed while saving the response'), 'logged at error level')
    const failing = await app.inject({ method: 'POST', url: '/failing', headers: key('k'), payload: {} })
    t.equal(failing.statusCode, 500)
    t.ok(logs.find(50, 'failed while settling a request (the handler failed)'))
    store.failing.clear()
    await new Promise((resolve) => setTimeout(resolve, 40))
    const retry = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
    t.same(retry.json(), halted, 'the unsaved record is reported halted once its lease lapses, never re-run')
    t.equal(runs, 2)
    await app.close()
  })

  t.test(`logs a store that ${failure} while halting an oversized response and still answers`, async (t) => {
    const store = new FaultyStore(undefined, { throws })
    const logs = logCollector()
    const app = Fastify({ logger: { level: 'error', stream: logs.stream } })
    await app.register(idempotency, { store, maxResponseSize: 1 })
    app.post('/big', { config: { idempotency: true } }, async () => 'too big')
    store.failing.add('update')
    const response = await app.inject({ method: 'POST', url: '/big', headers: key('k'), payload: {} })
    t.equal(response.body, 'too big')
    t.ok(logs.find(50, 'failed while settling a request (the response is larger than maxResponseSize'))
    await app.close()
  })
}

t.test('a handler timeout that answers while the store is asked frees the key: the handler never ran', async (t) => {
  const store = new FaultyStore()
  const logs = logCollector()
  const app = Fastify({ handlerTimeout: 20, logger: { level: 'warn', stream: logs.stream } })
  await app.register(idempotency, { store })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  store.delays.set('insert', 60)
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.equal(first.statusCode, 503)
  t.equal(first.json().code, 'FST_ERR_HANDLER_TIMEOUT')
  await new Promise((resolve) => setTimeout(resolve, 100))
  t.equal(runs, 0, 'the handler did not run after the timeout answered')
  t.ok(logs.find(40, 'idempotency record released: the request was answered before its handler ran'))
  store.delays.clear()
  const retry = await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} })
  t.same(retry.json(), { runs: 1 }, 'the retry runs the handler once')
  await app.close()
})

t.test('halts the record of a response body that cannot be stored', async (t) => {
  const logs = logCollector()
  const app = Fastify({ logger: { level: 'warn', stream: logs.stream } })
  let runs = 0
  // an onSend hook that runs before the plugin's turns the payload into something that is neither bytes nor a stream
  app.addHook('onSend', async (request, reply, payload) => runs === 1 && request.headers['x-first'] === '1' ? 42 : payload)
  await app.register(idempotency)
  app.post('/odd', { config: { idempotency: true } }, async () => { runs++; return 'x' })
  const first = await app.inject({ method: 'POST', url: '/odd', headers: { ...key('k'), 'x-first': '1' }, payload: {} })
  t.equal(first.statusCode, 500, 'Fastify itself refuses the payload')
  const retry = await app.inject({ method: 'POST', url: '/odd', headers: key('k'), payload: {} })
  t.equal(retry.statusCode, 500)
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.ok(logs.find(40, 'cannot be stored'))
  t.equal(runs, 1)
  await app.close()
})

t.test('stores a web Response with its status and headers', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/response', { config: { idempotency: true } }, async () => {
    runs++
    return new Response('created by fetch API', { status: 202, headers: { 'content-type': 'text/plain', 'x-kind': 'web' } })
  })
  app.post('/empty-response', { config: { idempotency: true } }, async () => { runs++; return new Response(null, { status: 200 }) })
  const first = await app.inject({ method: 'POST', url: '/response', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/response', headers: key('k'), payload: {} })
  t.equal(first.statusCode, 202)
  t.equal(first.body, 'created by fetch API')
  t.equal(replay.statusCode, 202)
  t.equal(replay.body, 'created by fetch API')
  t.equal(replay.headers['x-kind'], 'web')
  t.equal(replay.headers['content-type'], 'text/plain')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  const empty = await app.inject({ method: 'POST', url: '/empty-response', headers: key('k'), payload: {} })
  const emptyReplay = await app.inject({ method: 'POST', url: '/empty-response', headers: key('k'), payload: {} })
  t.equal(empty.body, '')
  t.equal(emptyReplay.body, '')
  t.equal(emptyReplay.headers['idempotent-replayed'], 'true')
  t.equal(runs, 2)
  await app.close()
})

t.test('stores typed-array responses', async (t) => {
  const app = await buildApp()
  app.post('/bytes', { config: { idempotency: true } }, async (request, reply) => {
    reply.type('application/octet-stream')
    return new Uint8Array([1, 2, 3])
  })
  const first = await app.inject({ method: 'POST', url: '/bytes', headers: key('k'), payload: {} })
  const replay = await app.inject({ method: 'POST', url: '/bytes', headers: key('k'), payload: {} })
  t.same(first.rawPayload, Buffer.from([1, 2, 3]))
  t.same(replay.rawPayload, Buffer.from([1, 2, 3]))
  t.equal(replay.headers['idempotent-replayed'], 'true')
  await app.close()
})

for (const kind of ['async', 'synchronous'] as const) {
  t.test(`halts the record of a hijacked reply once its response is finished (${kind} handler)`, async (t) => {
    const logs = logCollector()
    const app = Fastify({ logger: { level: 'warn', stream: logs.stream } })
    await app.register(idempotency, { releaseOnError: true })
    let runs = 0
    const handler = (request: FastifyRequest, reply: FastifyReply): void => {
      runs++
      reply.hijack()
      reply.raw.writeHead(200, { 'content-type': 'text/plain' })
      reply.raw.end('written by hand')
    }
    app.post('/raw', { config: { idempotency: true } }, kind === 'async' ? async (request, reply) => { handler(request, reply) } : handler)
    const first = await app.inject({ method: 'POST', url: '/raw', headers: key('k'), payload: {} })
    t.equal(first.body, 'written by hand')
    await new Promise((resolve) => setTimeout(resolve, 10))
    const retry = await app.inject({ method: 'POST', url: '/raw', headers: key('k'), payload: {} })
    t.same(retry.json(), halted, 'halted, not released: the handler did its work')
    t.ok(logs.find(40, 'idempotency record halted: the reply was hijacked'))
    t.equal(runs, 1)
    await app.close()
  })
}

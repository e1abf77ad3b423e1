import { connect } from 'node:net'
import { Readable } from 'node:stream'
import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { buildApp } from './helpers/app.js'
import { deferred, key, sleep } from './helpers/timing.js'

// Waits for a record to reach a state, polling: no assertion on how long it takes.
async function settledAs (app: FastifyInstance, route: string, clientKey: string, state: string, scope?: string): Promise<string | undefined> {
  let found: string | undefined
  for (let attempt = 0; attempt < 500; attempt++) {
    found = (await app.idempotency.find({ method: 'POST', route, key: clientKey, scope }))?.state
    if (found === state) return found
    await sleep(10)
  }
  return found
}

async function abandonedRequest (port: number, clientKey: string): Promise<void> {
  await new Promise<void>((resolve) => {
    const socket = connect({ host: '127.0.0.1', port }, () => {
      socket.write(`POST /work HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nIdempotency-Key: ${clientKey}\r\nContent-Length: 2\r\n\r\n{}`)
      socket.destroy()
      resolve()
    })
  })
}

t.test('an async handler that sends nothing after its client went away leaves a halted record, not a running one', async (t) => {
  const app = await buildApp({ processingTtl: 60 })
  t.teardown(() => app.close())
  const gone = deferred()
  const finished = deferred()
  let runs = 0
  app.post('/work', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    await gone.promise
    reply.code(204)
    finished.resolve()
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const closed = new Promise<void>((resolve) => { app.server.once('connection', (socket) => socket.once('close', () => resolve())) })
  await abandonedRequest((app.server.address() as { port: number }).port, 'gone')
  await closed
  gone.resolve()
  await finished.promise
  t.equal(await settledAs(app, '/work', 'gone', 'halted'), 'halted', 'the record is halted once the handler is done')
  const retry = await app.inject({ method: 'POST', url: '/work', headers: key('gone'), payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 1)
})

t.test('a reply hijacked after the handler returned halts its record', async (t) => {
  const app = await buildApp({ processingTtl: 60 })
  t.teardown(() => app.close())
  let runs = 0
  app.post('/work', { config: { idempotency: true } }, (request, reply) => {
    runs++
    setImmediate(() => {
      reply.hijack()
      reply.raw.writeHead(200, { 'content-type': 'text/plain' })
      reply.raw.end('raw')
    })
  })
  const first = await app.inject({ method: 'POST', url: '/work', headers: key('late'), payload: {} })
  t.equal(first.body, 'raw')
  t.equal(await settledAs(app, '/work', 'late', 'halted'), 'halted')
  const retry = await app.inject({ method: 'POST', url: '/work', headers: key('late'), payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 1)
})

t.test('a thenable a handler returns is resolved once, as Fastify alone would', async (t) => {
  const app = await buildApp()
  t.teardown(() => app.close())
  let inserts = 0
  // A query builder: each then runs the query again.
  const insertOrder = (): PromiseLike<{ id: number }> => ({
    then (resolve, reject) {
      inserts++
      return Promise.resolve({ id: inserts }).then(resolve, reject)
    }
  })
  app.post('/orders', { config: { idempotency: true } }, () => insertOrder())
  const first = await app.inject({ method: 'POST', url: '/orders', headers: key('builder'), payload: {} })
  t.same(first.json(), { id: 1 })
  t.equal(inserts, 1, 'the query ran once')
  const retry = await app.inject({ method: 'POST', url: '/orders', headers: key('builder'), payload: {} })
  t.same(retry.json(), { id: 1 })
  t.equal(retry.headers['idempotent-replayed'], 'true')
  t.equal(inserts, 1)
})

t.test('a web Response with a 5xx status halts, or releases with releaseOnError, as reply.code(5xx) does', async (t) => {
  for (const releaseOnError of [false, true]) {
    const app = await buildApp({ releaseOnError })
    t.teardown(() => app.close())
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async () => {
      runs++
      return new Response('try later', { status: 503, headers: { 'content-type': 'text/plain' } })
    })
    const first = await app.inject({ method: 'POST', url: '/orders', headers: key('web-5xx'), payload: {} })
    t.equal(first.statusCode, 503)
    t.equal(first.body, 'try later', 'the client gets the Response body')
    const retry = await app.inject({ method: 'POST', url: '/orders', headers: key('web-5xx'), payload: {} })
    if (releaseOnError) {
      t.equal(retry.body, 'try later', 'released: the retry runs the handler again')
      t.equal(runs, 2)
    } else {
      t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED', 'halted: never replayed')
      t.equal(runs, 1)
    }
  }
})

t.test('a handler timeout never releases the key of a callback-style handler that still runs', async (t) => {
  const app = await buildApp({ releaseOnError: true }, { handlerTimeout: 50 })
  t.teardown(() => app.close())
  const slow = deferred()
  let runs = 0
  let running = 0
  let mostAtOnce = 0
  app.post('/charge', { config: { idempotency: true } }, (request, reply) => {
    runs++
    mostAtOnce = Math.max(mostAtOnce, ++running)
    slow.promise.then(() => {
      running--
      reply.send({ charged: true })
    }, () => {})
  })
  const first = await app.inject({ method: 'POST', url: '/charge', headers: key('slow'), payload: {} })
  t.equal(first.json().code, 'FST_ERR_HANDLER_TIMEOUT')
  const retry = await app.inject({ method: 'POST', url: '/charge', headers: key('slow'), payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED', 'the retry is told the outcome is unknown')
  slow.resolve()
  t.equal(runs, 1)
  t.equal(mostAtOnce, 1)
})

t.test('a streamed response that an onSend hook after the plugin fails is halted, and its stream is not left open', async (t) => {
  const app = await buildApp()
  t.teardown(() => app.close())
  let failing = true
  let runs = 0
  const source = deferred()
  let stream: Readable | undefined
  app.post('/report', {
    config: { idempotency: true },
    onSend: async (request, reply, payload) => {
      if (failing) {
        failing = false
        throw new Error('signing service down')
      }
      return payload
    }
  }, async (request, reply) => {
    runs++
    // Larger than the streams' buffers, so that it cannot end unread.
    stream = Readable.from(Array.from({ length: 20 }, () => 'x'.repeat(16_384)))
    stream.once('close', () => { source.resolve() })
    return reply.type('text/csv').send(stream)
  })
  const first = await app.inject({ method: 'POST', url: '/report', headers: key('report'), payload: {} })
  t.equal(first.statusCode, 500)
  await source.promise
  t.equal(stream?.destroyed, true, 'the source stream is destroyed')
  t.equal(await settledAs(app, '/report', 'report', 'halted'), 'halted')
  const retry = await app.inject({ method: 'POST', url: '/report', headers: key('report'), payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 1)
})

t.test('a reply hijacked by a handler that runs after its client went away halts its record', async (t) => {
  const app = await buildApp({ processingTtl: 60, scope: async () => { await sleep(50); return 'user' } })
  t.teardown(() => app.close())
  let runs = 0
  const ran = deferred()
  app.post('/work', { config: { idempotency: true } }, (request, reply) => {
    runs++
    reply.hijack()
    reply.raw.end()
    ran.resolve()
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  // The client is gone while the scope still runs, before the handler.
  await abandonedRequest((app.server.address() as { port: number }).port, 'early')
  await ran.promise
  t.equal(await settledAs(app, '/work', 'early', 'halted', 'user'), 'halted')
  t.equal(runs, 1)
})

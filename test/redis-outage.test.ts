import t from 'tap'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import idempotency, { RedisStore } from '../lib/index.js'
import { startProxy } from './helpers/proxy.js'
import { requireRedis, startRedis } from './helpers/redis-server.js'
import { key, sleep } from './helpers/timing.js'

if (requireRedis(t)) {
  t.test('answers 503 within the timeout while Redis is down, recovers by itself, and loses nothing', async (t) => {
    const server = await startRedis({ persistence: true })
    t.teardown(() => server.stop())
    const client = new Redis({ host: '127.0.0.1', port: server.port, retryStrategy: () => 50 })
    const app = Fastify()
    await app.register(idempotency, { store: new RedisStore({ client, timeout: 300 }) })
    t.teardown(async () => { await app.close(); client.disconnect() })
    const runs: Record<string, number> = {}
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
      const name = request.idempotencyKey as string
      runs[name] = (runs[name] ?? 0) + 1
      return reply.code(201).send({ order: name })
    })
    const send = (name: string) => app.inject({ method: 'POST', url: '/orders', headers: key(name), payload: { amount: 1 } })

    t.equal((await send('before')).statusCode, 201, 'a request completes before the outage')
    await server.stop()

    for (const name of ['before', 'during']) {
      const started = Date.now()
      const response = await send(name)
      const took = Date.now() - started
      t.equal(response.statusCode, 503, `${name}: 503 while Redis is down`)
      t.equal(response.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
      t.equal(response.headers['retry-after'], '5')
      t.ok(took < 1000, `${name}: answered in ${took} ms, within the timeout`)
    }
    t.same(runs, { before: 1 }, 'nothing ran during the outage')

    await server.start()
    for (let attempt = 0; attempt < 100 && client.status !== 'ready'; attempt++) await sleep(50)
    t.equal(client.status, 'ready', 'the client reconnected by itself')

    const replay = await send('before')
    t.equal(replay.statusCode, 201)
    t.equal(replay.headers['idempotent-replayed'], 'true', 'the record written before the outage survived the restart')
    const after = await send('during')
    t.equal(after.statusCode, 201, 'requests succeed again without restarting the app')
    t.equal(after.headers['idempotent-replayed'], undefined)
    t.same(runs, { before: 1, during: 1 })
  })

  t.test('a request whose insert ran but whose answer was lost with the connection gets 503, and its retry runs once', async (t) => {
    const server = await startRedis()
    const proxy = await startProxy(server.port)
    t.teardown(async () => { await proxy.close(); await server.stop() })
    const client = new Redis({ host: '127.0.0.1', port: proxy.port, retryStrategy: () => 300 })
    const admin = new Redis({ host: '127.0.0.1', port: server.port })
    const app = Fastify()
    await app.register(idempotency, { store: new RedisStore({ client, timeout: 100 }) })
    t.teardown(async () => { await app.close(); client.disconnect(); admin.disconnect() })
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
      runs++
      return reply.code(201).send({ order: runs })
    })
    const send = async () => await app.inject({ method: 'POST', url: '/orders', headers: key('lost'), payload: { amount: 1 } })
    t.equal((await app.inject({ method: 'POST', url: '/orders', headers: key('warm'), payload: { amount: 1 } })).statusCode, 201, 'connected')
    runs = 0

    proxy.dropReplies()
    const lost = send()
    for (let attempt = 0; attempt < 50 && await admin.dbsize() < 2; attempt++) await sleep(5)
    t.equal(await admin.dbsize(), 2, 'Redis ran the insert; its answer is lost')
    await proxy.cut()
    const response = await lost
    t.equal(response.statusCode, 503)
    t.equal(response.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
    await proxy.heal()
    for (let attempt = 0; attempt < 100 && (client.status !== 'ready' || await admin.dbsize() > 1); attempt++) await sleep(20)
    t.equal(await admin.dbsize(), 1, 'its record was deleted once the client was back')
    const retry = await send()
    t.equal(retry.statusCode, 201, 'not 409 nor HALTED: the key was freed')
    t.equal(runs, 1, 'the handler ran once, for the retry')
    t.equal((await send()).headers['idempotent-replayed'], 'true')
  })
}

import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import fastifyRedis from '@fastify/redis'
import { Redis } from 'ioredis'
import idempotency, { InvalidOptionError, RedisStore, type IdempotencyOptions } from '../lib/index.js'
import { requireRedis, startRedis, type RedisServer } from './helpers/redis-server.js'
import { exactlyOnceAcrossInstances, killedInstance, killedWhileWaited } from './helpers/shared-store.js'
import { key } from './helpers/timing.js'

if (requireRedis(t)) {
  let server: RedisServer
  t.before(async () => { server = await startRedis() })
  t.teardown(async () => { await server.stop() })

  async function redisApp (t: Test, options: IdempotencyOptions = {}, prefix = 'idem:'): Promise<FastifyInstance> {
    const client = new Redis({ port: server.port, host: '127.0.0.1' })
    const app = Fastify()
    await app.register(idempotency, { store: new RedisStore({ client, prefix }), ...options })
    t.teardown(async () => {
      await app.close()
      client.disconnect()
    })
    return app
  }

  t.test('a track, a completion and a replay are one Redis round trip each', async (t) => {
    const client = new Redis({ port: server.port, host: '127.0.0.1' })
    const sent: string[] = []
    const sendCommand = client.sendCommand.bind(client)
    client.sendCommand = (command, stream) => {
      sent.push(command.name)
      return sendCommand(command, stream)
    }
    const app = Fastify()
    await app.register(idempotency, { store: new RedisStore({ client }) })
    t.teardown(async () => { await app.close(); client.disconnect() })
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => reply.code(201).send({ runs: ++runs }))
    // the first use of each script loads it: EVALSHA answers NOSCRIPT once, then EVAL
    await app.inject({ method: 'POST', url: '/orders', headers: key('warm'), payload: {} })
    await app.inject({ method: 'POST', url: '/orders', headers: key('warm'), payload: {} })
    sent.length = 0
    const first = await app.inject({ method: 'POST', url: '/orders', headers: key('rt'), payload: {} })
    t.equal(first.statusCode, 201)
    t.same(sent, ['evalsha', 'evalsha'], 'fresh key: insert-or-get, then complete')
    sent.length = 0
    const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('rt'), payload: {} })
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.same(sent, ['evalsha'], 'replay: one insert-or-get')
    t.equal(runs, 2)
  })

  t.test('replays a binary body byte for byte through Redis', async (t) => {
    const app = await redisApp(t)
    const bytes = Buffer.from(Array.from({ length: 4096 }, (_, index) => (index * 7919) % 256))
    app.post('/blob', { config: { idempotency: true } }, async (request, reply) => reply.type('application/octet-stream').send(bytes))
    const first = await app.inject({ method: 'POST', url: '/blob', headers: key('blob'), payload: {} })
    const replay = await app.inject({ method: 'POST', url: '/blob', headers: key('blob'), payload: {} })
    t.same(first.rawPayload, bytes)
    t.same(replay.rawPayload, bytes)
    t.equal(replay.headers['idempotent-replayed'], 'true')
  })

  t.test('stores a record as one string that Redis expires itself', async (t) => {
    const admin = new Redis({ port: server.port, host: '127.0.0.1' })
    t.teardown(() => admin.disconnect())
    const app = await redisApp(t, { cacheTtl: 60_000 }, 'layout:')
    app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
    await app.inject({ method: 'POST', url: '/orders', headers: key('layout'), payload: {} })
    const keys = await admin.keys('layout:*')
    t.equal(keys.length, 1)
    const stored = keys[0] as string
    t.match(stored, /^layout:[A-Za-z0-9_-]{43}$/, 'the prefix and a hashed key')
    t.equal(await admin.type(stored), 'string')
    // c, expiry, fingerprint length, then the fingerprint, status, headers and body.
    const value = await admin.get(stored) as string
    const [state, expires, length] = value.split('\n', 3) as [string, string, string]
    t.equal(state, 'c')
    const fingerprintStart = state.length + expires.length + length.length + 3
    const fingerprint = value.slice(fingerprintStart, fingerprintStart + Number(length))
    t.match(fingerprint, /^[A-Za-z0-9_-]{43}$/, 'a store outside the process gets a digest')
    const [status, headers, body] = value.slice(fingerprintStart + Number(length)).split('\n') as [string, string, string]
    t.equal(status, '200')
    t.equal(JSON.parse(headers)['content-type'], 'application/json; charset=utf-8')
    t.equal(body, '{"ok":true}')
    const ttl = await admin.pttl(stored)
    t.ok(ttl > 55_000 && ttl <= 60_000, `PTTL ${ttl}`)
    t.ok(Math.abs(Number(expires) - (Date.now() + ttl)) < 1000, 'the expiry written is the one Redis applies')
  })

  t.test('many instances sharing one Redis run a keyed handler exactly once', async (t) => {
    await exactlyOnceAcrossInstances(t, redisApp)
  })

  t.test('a killed instance\'s record answers 409 until its lease lapses, then 500 HALTED', async (t) => {
    await killedInstance(t, redisApp, ['redis', String(server.port)], false)
  })

  t.test('with releaseOnError a killed instance\'s key is taken over once its lease lapses', async (t) => {
    await killedInstance(t, redisApp, ['redis', String(server.port)], true)
  })

  t.test('duplicates waiting for a killed instance\'s request are told it halted once its lease lapses', async (t) => {
    await killedWhileWaited(t, redisApp, ['redis', String(server.port)], false)
  })

  t.test('with releaseOnError one duplicate waiting for a killed instance\'s request takes it over, the others get its response', async (t) => {
    await killedWhileWaited(t, redisApp, ['redis', String(server.port)], true)
  })

  t.test('store: \'redis\' uses the client of @fastify/redis', async (t) => {
    const app = Fastify()
    await app.register(fastifyRedis, { host: '127.0.0.1', port: server.port })
    await app.register(idempotency, { store: 'redis' })
    t.teardown(() => app.close())
    t.ok(app.idempotency.store instanceof RedisStore)
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
    await app.inject({ method: 'POST', url: '/orders', headers: key('shorthand'), payload: {} })
    const replay = await app.inject({ method: 'POST', url: '/orders', headers: key('shorthand'), payload: {} })
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(runs, 1)
  })
}

t.test('store: \'redis\' without @fastify/redis fails at register, saying what to do', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  const error = await app.register(idempotency, { store: 'redis' }).then(() => undefined, (failure: unknown) => failure)
  t.ok(error instanceof InvalidOptionError)
  t.equal((error as Error).message,
    "Invalid fastify-idempotency option: store 'redis' needs @fastify/redis: register it before fastify-idempotency")
})

t.test('RedisStore rejects bad options, naming them', async (t) => {
  t.throws(() => new RedisStore({ client: {} as never }), { code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: /client must be an ioredis client/ })
  const client = { defineCommand: () => {}, status: 'ready' }
  t.throws(() => new RedisStore({ client, timeout: 0 }), { message: /timeout must be >= 1/ })
  t.throws(() => new RedisStore({ client, bogus: 1 } as never), { message: /RedisStore has unknown option 'bogus'/ })
})

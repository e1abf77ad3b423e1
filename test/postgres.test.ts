import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import fastifyPostgres from '@fastify/postgres'
import pg from 'pg'
import idempotency, { InvalidOptionError, PostgresStore, POSTGRES_SCHEMA, type IdempotencyOptions } from '../lib/index.js'
import { requirePostgres, startPostgres, type PostgresServer } from './helpers/postgres-server.js'
import { exactlyOnceAcrossInstances, killedInstance, killedWhileWaited } from './helpers/shared-store.js'
import { key, sleep } from './helpers/timing.js'

t.test('store: \'postgres\' without @fastify/postgres fails at register, saying what to do', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  const error = await app.register(idempotency, { store: 'postgres' }).then(() => undefined, (failure: unknown) => failure)
  t.ok(error instanceof InvalidOptionError)
  t.equal((error as Error).message,
    "Invalid fastify-idempotency option: store 'postgres' needs @fastify/postgres: register it before fastify-idempotency")
})

if (requirePostgres(t)) {
  let server: PostgresServer
  t.before(async () => {
    server = await startPostgres()
    const pool = new pg.Pool({ connectionString: server.connectionString })
    await pool.query(POSTGRES_SCHEMA)
    await pool.end()
  })
  t.teardown(async () => { await server.destroy() })

  async function postgresApp (t: Test, options: IdempotencyOptions = {}): Promise<FastifyInstance> {
    const pool = new pg.Pool({ connectionString: server.connectionString, max: 5 })
    const app = Fastify()
    await app.register(idempotency, { store: new PostgresStore({ pool }), ...options })
    t.teardown(async () => {
      await app.close()
      await pool.end()
    })
    return app
  }

  t.test('many instances sharing one database run a keyed handler exactly once', async (t) => {
    await exactlyOnceAcrossInstances(t, postgresApp)
  })

  t.test('a killed instance\'s record answers 409 until its lease lapses, then 500 HALTED', async (t) => {
    await killedInstance(t, postgresApp, ['postgres', server.connectionString], false)
  })

  t.test('with releaseOnError a killed instance\'s key is taken over once its lease lapses', async (t) => {
    await killedInstance(t, postgresApp, ['postgres', server.connectionString], true)
  })

  t.test('duplicates waiting for a killed instance\'s request are told it halted once its lease lapses', async (t) => {
    await killedWhileWaited(t, postgresApp, ['postgres', server.connectionString], false)
  })

  t.test('with releaseOnError one duplicate waiting for a killed instance\'s request takes it over, the others get its response', async (t) => {
    await killedWhileWaited(t, postgresApp, ['postgres', server.connectionString], true)
  })

  t.test('replays a binary body byte for byte through PostgreSQL', async (t) => {
    const app = await postgresApp(t)
    const bytes = Buffer.from(Array.from({ length: 4096 }, (_, index) => (index * 7919) % 256))
    app.post('/blob', { config: { idempotency: true } }, async (request, reply) => reply.type('application/octet-stream').send(bytes))
    const name = `blob-${Date.now()}`
    const first = await app.inject({ method: 'POST', url: '/blob', headers: key(name), payload: {} })
    const replay = await app.inject({ method: 'POST', url: '/blob', headers: key(name), payload: {} })
    t.same(first.rawPayload, bytes)
    t.same(replay.rawPayload, bytes)
    t.equal(replay.headers['idempotent-replayed'], 'true')
  })

  t.test('store: \'postgres\' uses the pool of @fastify/postgres', async (t) => {
    const app = Fastify()
    await app.register(fastifyPostgres, { connectionString: server.connectionString })
    await app.register(idempotency, { store: 'postgres' })
    t.teardown(() => app.close())
    t.ok(app.idempotency.store instanceof PostgresStore)
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
    const name = `shorthand-${Date.now()}`
    await app.inject({ method: 'POST', url: '/orders', headers: key(name), payload: {} })
    const replay = await app.inject({ method: 'POST', url: '/orders', headers: key(name), payload: {} })
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(runs, 1)
  })

  t.test('answers 503 within the timeout while the database is down, and recovers by itself', async (t) => {
    const own = await startPostgres({ private: true })
    t.teardown(() => own.destroy())
    const pool = new pg.Pool({ connectionString: own.connectionString, connectionTimeoutMillis: 500 })
    // an idle client whose server went away reports it on the pool: the app must listen
    pool.on('error', () => {})
    const app = Fastify()
    await app.register(idempotency, { store: new PostgresStore({ pool, createTable: true, timeout: 500 }) })
    t.teardown(async () => { await app.close(); await pool.end() })
    const runs: Record<string, number> = {}
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
      const name = request.idempotencyKey as string
      runs[name] = (runs[name] ?? 0) + 1
      return reply.code(201).send({ order: name })
    })
    const send = (name: string) => app.inject({ method: 'POST', url: '/orders', headers: key(name), payload: {} })
    t.equal((await send('before')).statusCode, 201)
    await own.stop()
    for (const name of ['before', 'during']) {
      const started = Date.now()
      const response = await send(name)
      const took = Date.now() - started
      t.equal(response.statusCode, 503, `${name}: 503 while the database is down`)
      t.equal(response.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
      t.ok(took < 1500, `${name}: answered in ${took} ms`)
    }
    await own.start()
    let recovered = await send('during')
    for (let attempt = 0; attempt < 20 && recovered.statusCode === 503; attempt++) {
      await sleep(100)
      recovered = await send('during')
    }
    t.equal(recovered.statusCode, 201, 'requests succeed again without restarting the app')
    const replay = await send('before')
    t.equal(replay.headers['idempotent-replayed'], 'true', 'what completed before the outage is still there')
    t.same(runs, { before: 1, during: 1 })
  })
}

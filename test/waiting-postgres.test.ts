import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import pg from 'pg'
import idempotency, { PostgresStore, postgresChannel, type IdempotencyOptions } from '../lib/index.js'
import { requirePostgres, startPostgres, type PostgresServer } from './helpers/postgres-server.js'
import { deferred, key, sleep } from './helpers/timing.js'
import { blockingOrders, outageWhileWaiting, waiters, type BlockingOrders } from './helpers/waiting.js'

interface Setup extends BlockingOrders {
  server: PostgresServer
  pool: pg.Pool
  app: FastifyInstance
  store: PostgresStore
}

const table = 'waited_requests'

// One app on a private PostgreSQL, whose first request with a key runs until `finish`.
async function setup (t: Test, options: IdempotencyOptions = {}): Promise<Setup> {
  const server = await startPostgres({ private: true })
  const pool = new pg.Pool({ connectionString: server.connectionString, max: 4 })
  pool.on('error', () => {})
  const store = new PostgresStore({ pool, table, createTable: true, timeout: 500 })
  const app = Fastify()
  await app.register(idempotency, { store, wait: 10_000, ...options })
  t.teardown(async () => {
    await app.close()
    await pool.end()
    await server.destroy()
  })
  return { server, pool, app, store, ...blockingOrders(app) }
}

// The backends LISTENing on the store's channel, as the server sees them.
async function listeners (pool: pg.Pool): Promise<number[]> {
  const { rows } = await pool.query("SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()")
  return rows.map((row: { pid: number }) => row.pid)
}

async function marked (pool: pg.Pool, storageKey: string): Promise<void> {
  for (;;) {
    const { rows } = await pool.query({ text: `SELECT waited FROM ${table} WHERE key = $1`, values: [storageKey] })
    if (rows[0]?.waited === true) return
    await sleep(5)
  }
}

t.test('PostgreSQL notifies the end of a record a duplicate waits for, at commit, and nothing for one nobody waits for', async (t) => {
  if (!requirePostgres(t)) return
  const { pool, runs, started, finish, send } = await setup(t)
  const spy = await pool.connect()
  t.teardown(() => { spy.release() })
  const told: string[] = []
  spy.on('notification', (message) => { told.push(`${message.channel} ${message.payload as string}`) })
  await spy.query(`LISTEN "${postgresChannel(table)}"`)

  // Nobody waits: its end notifies nothing.
  finish()
  t.equal((await send('alone')).statusCode, 201)

  // A duplicate waits, from a second app on the same table: its end notifies once.
  const other = Fastify()
  await other.register(idempotency, { store: new PostgresStore({ pool, table }), wait: 10_000 })
  t.teardown(() => other.close())
  const finishOther = deferred()
  const startedOther = deferred()
  other.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    startedOther.resolve()
    await finishOther.promise
    return reply.code(201).send({ id: 'ord_2' })
  })
  const sendOther = async () => await other.inject({ method: 'POST', url: '/orders', headers: key('waited'), payload: { amount: 1 } })
  const running = sendOther()
  await startedOther.promise
  const duplicate = sendOther()
  await waiters(other, 1)
  const storageKey = other.idempotency.keyOf({ method: 'POST', route: '/orders', key: 'waited' })
  await marked(pool, storageKey)
  finishOther.resolve()
  t.equal((await running).statusCode, 201)
  const replay = await duplicate
  t.equal(replay.statusCode, 201)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  while (told.length === 0) await sleep(5)
  // Notifications come in commit order: the unwaited record's end, committed first, would be first.
  t.strictSame(told, [`${postgresChannel(table)} ${storageKey}`], 'one notification, its payload the storage key (a digest)')
  t.equal(runs(), 1)
  await started
})

t.test('a waiter survives its LISTEN connection being terminated, which is opened again, and gets the replay', async (t) => {
  if (!requirePostgres(t)) return
  const { pool, app, runs, started, finish, send } = await setup(t)
  const running = send('killed')
  await started
  const duplicate = send('killed')
  await waiters(app, 1)
  await marked(pool, app.idempotency.keyOf({ method: 'POST', route: '/orders', key: 'killed' }))
  const [first] = await listeners(pool)
  t.ok(first, 'one LISTEN connection')
  await pool.query({ text: 'SELECT pg_terminate_backend($1)', values: [first] })
  let again = await listeners(pool)
  while (again.length === 0 || again[0] === first) {
    await sleep(20)
    again = await listeners(pool)
  }
  t.equal(again.length, 1, 'the store LISTENs again, on one new connection')
  finish()
  t.equal((await running).statusCode, 201)
  const replay = await duplicate
  t.equal(replay.statusCode, 201)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(runs(), 1)
})

t.test('a PostgreSQL outage while a duplicate waits answers 503, and waiting works again once it is back', async (t) => {
  if (!requirePostgres(t)) return
  const waiting = await setup(t)
  const { pool, store } = waiting
  await outageWhileWaiting(t, waiting, waiting.server, 'PostgreSQL')
  // A new watch opens the LISTEN connection again.
  const told = deferred()
  const unwatch = store.watch('later', () => { told.resolve() })
  await told.promise
  unwatch()
  t.equal((await listeners(pool)).length, 1, 'one LISTEN connection again')
})

t.test('a lost LISTEN connection is opened again while duplicates wait, and not once they left; listeners of a key share it', async (t) => {
  if (!requirePostgres(t)) return
  const server = await startPostgres({ private: true })
  const pool = new pg.Pool({ connectionString: server.connectionString, max: 2 })
  pool.on('error', () => {})
  const store = new PostgresStore({ pool, table, createTable: true, timeout: 500 })
  t.teardown(async () => {
    await store.close()
    await pool.end()
    await server.destroy()
  })
  await store.prune()
  const told = { first: 0, second: 0 }
  const unwatch = store.watch('k', () => { told.first++ })
  // A second listener on the key shares its mark.
  const unwatchSecond = store.watch('k', () => { told.second++ })
  while (told.first === 0 || told.second === 0) await sleep(5)
  t.strictSame(told, { first: 1, second: 1 }, 'each is told once it listens')
  unwatchSecond()
  await server.stop()
  await server.start()
  // The connection that was lost is opened again a second later, then every waiter is told.
  while (told.first < 2) await sleep(20)
  t.equal((await listeners(pool)).length, 1, 'listening again')
  const terminate = async (): Promise<void> => {
    const [pid] = await listeners(pool)
    await pool.query({ text: 'SELECT pg_terminate_backend($1)', values: [pid] })
    while ((await listeners(pool)).length > 0) await sleep(20)
  }
  // Lost after the last waiter left.
  unwatch()
  await terminate()
  await sleep(1500)
  t.strictSame(await listeners(pool), [], 'nobody waits: no connection is opened again')
  // Lost while one waits, who leaves before the connection is opened again.
  const listening = deferred()
  const unwatchAgain = store.watch('k', () => { listening.resolve() })
  await listening.promise
  await terminate()
  unwatchAgain()
  await sleep(1500)
  t.strictSame(await listeners(pool), [], 'the waiter left before the retry: no connection is opened again')
})

t.test('app.close() ends the LISTEN connection; a pool without a Client class leaves waiters to look on their own', async (t) => {
  if (!requirePostgres(t)) return
  const { pool, app, started, finish, send } = await setup(t)
  const running = send('closing')
  await started
  const duplicate = send('closing')
  await waiters(app, 1)
  while ((await listeners(pool)).length === 0) await sleep(5)
  await app.close()
  t.equal((await duplicate).statusCode, 503, 'the waiter is answered at close')
  finish()
  await running
  t.strictSame(await listeners(pool), [], 'no LISTEN connection is left')

  // A pool that has only `query`, as a wrapper may: duplicates are looked up at the fallback interval.
  const bare = Fastify()
  await bare.register(idempotency, { store: new PostgresStore({ pool: { query: async (query) => await pool.query(query) }, table }), wait: 5000 })
  t.teardown(() => bare.close())
  let runs = 0
  bare.post('/orders', { config: { idempotency: true } }, async () => {
    runs++
    await sleep(200)
    return { runs }
  })
  const answers = await Promise.all(Array.from({ length: 5 }, async () => await bare.inject({ method: 'POST', url: '/orders', headers: key('polled'), payload: {} })))
  t.equal(runs, 1)
  t.strictSame([...new Set(answers.map((answer) => `${answer.statusCode} ${answer.body}`))], ['200 {"runs":1}'])
  t.strictSame(await listeners(pool), [], 'and it opened no connection')
})

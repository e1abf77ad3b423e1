// One benchmark server in its own process: `node benchmarks/server.js <bare|control|memory|full|discard|redis|postgres>`.
// It reports its port over IPC and answers { cpu } with its own CPU time, so the runner measures
// only this process's work, not autocannon's.
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import pg from 'pg'
import idempotency, { MemoryStore, PostgresStore, RedisStore } from '../dist/index.js'

const variant = process.argv[2] ?? 'bare'
const app = Fastify({ logger: false })

// `control` is bare Fastify again, measured as a variant: its ratio to bare is the run's noise.
if (variant !== 'bare' && variant !== 'control') {
  await app.register(idempotency, { store: await storeFor(variant), required: false })
}

app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
  return reply.code(201).send({ id: 'ord_1', amount: request.body.amount, status: 'created' })
})

await app.listen({ host: '127.0.0.1', port: 0 })
process.send({ port: app.server.address().port })
process.on('message', (message) => {
  if (message === 'cpu') process.send({ cpu: process.cpuUsage() })
  if (message === 'stop') app.close().then(() => process.exit(0))
})

async function storeFor (name) {
  if (name === 'memory') return undefined
  // A memory store at its bound, as a long-running instance's is: each new record evicts an old
  // one, and the heap no longer grows.
  if (name === 'full') return new MemoryStore({ maxBytes: 1024 * 1024 })
  // The plugin's own path with a store that answers at once and keeps nothing: what the memory
  // store costs beyond it is the cost of keeping records.
  if (name === 'discard') {
    return { inProcess: true, insert: () => ({ inserted: true }), lookup: () => undefined, update: () => true, delete: () => true, prune: () => 0 }
  }
  if (name === 'redis') {
    const client = new Redis({ host: '127.0.0.1', port: Number(process.env.BENCH_REDIS_PORT) })
    app.addHook('onClose', async () => { client.disconnect() })
    return new RedisStore({ client })
  }
  if (name === 'postgres') {
    const pool = new pg.Pool({ connectionString: process.env.BENCH_DATABASE_URL, max: 10 })
    const table = `bench_${process.pid}`
    app.addHook('onClose', async () => {
      await pool.query(`DROP TABLE IF EXISTS ${table}`)
      await pool.end()
    })
    return new PostgresStore({ pool, table, createTable: true })
  }
  throw new Error(`unknown benchmark variant ${name}`)
}

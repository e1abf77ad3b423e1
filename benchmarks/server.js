// One benchmark server in its own process:
// `node benchmarks/server.js <bare|control|floor|floor-redis|node-idempotency-redis|memory|full|redis|postgres|before-memory|before-redis>`,
// each store variant also as `<variant>-wait` (duplicates wait 5 s for the first request instead of a 409).
// It reports its port over IPC and answers { cpu } with its own CPU time, so the runner measures
// only this process's work, not autocannon's.
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import pg from 'pg'
import { Idempotency, IdempotencyError } from '@node-idempotency/core'
import { RedisStorageAdapter } from '@node-idempotency/storage-adapter-redis'

const variant = process.argv[2] ?? 'bare'
const app = Fastify({ logger: false })
// `before-*`: the plugin built from another version (the dist folder BENCH_BEFORE names), to
// compare two versions in the same run.
const before = variant.startsWith('before-')
const waits = variant.endsWith('-wait')
const storeName = (before ? variant.slice('before-'.length) : variant).replace(/-wait$/, '')
const { default: idempotency, MemoryStore, PostgresStore, RedisStore } = await import(before ? `${process.env.BENCH_BEFORE}/index.js` : '../dist/index.js')

// `control` is bare Fastify again, measured as a variant: its ratio to bare is the run's noise.
if (!['bare', 'control', 'floor', 'floor-redis', 'node-idempotency-redis'].includes(variant)) {
  await app.register(idempotency, { store: await storeFor(storeName), required: false, ...(waits ? { wait: 5000 } : {}) })
}

async function createOrder (request, reply) {
  return reply.code(201).send({ id: 'ord_1', amount: request.body.amount, status: 'created' })
}

if (variant === 'floor') app.post('/orders', floorRoute(createOrder, mapRecords()))
else if (variant === 'floor-redis') app.post('/orders', floorRoute(createOrder, redisRecords(redisClient())))
else if (variant === 'node-idempotency-redis') app.post('/orders', await nodeIdempotencyRoute(createOrder))
else app.post('/orders', { config: { idempotency: true } }, createOrder)
// For the `duplicates` scenario: an order that takes 20 ms, long enough for duplicates to meet it running.
app.post('/slow-orders', { config: { idempotency: true } }, async (request, reply) => {
  await new Promise((resolve) => setTimeout(resolve, 20))
  return createOrder(request, reply)
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
  if (name === 'redis') return new RedisStore({ client: redisClient() })
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

// `floor` and `floor-redis`: the least an idempotency layer does, written into the route, without
// the plugin: the key from its header, the body's JSON text for a fingerprint, the response kept
// at onSend and sent again to a retry. Records are in a Map that is never bounded nor expired, or
// in Redis, claimed with one `SET … NX GET` and saved with one `SET`. What any implementation
// costs at the least, against which the plugin's own cost can be read.
function floorRoute (handler, records) {
  app.decorateRequest('floorRecord', undefined)
  app.decorateRequest('floorKey', undefined)
  return {
    onSend (request, reply, payload, next) {
      const record = request.floorRecord
      if (record === undefined) {
        next(null, payload)
        return
      }
      Object.assign(record, { done: true, statusCode: reply.statusCode, headers: reply.getHeaders(), body: payload })
      const saved = records.save(request.floorKey, record)
      if (saved instanceof Promise) saved.then(() => { next(null, payload) }, next)
      else next(null, payload)
    },
    handler (request, reply) {
      const key = request.headers['idempotency-key']
      if (key === undefined) return handler.call(this, request, reply)
      const recordKey = `POST /orders ${key}`
      const fingerprint = JSON.stringify(request.body)
      const claimed = { done: false, fingerprint, statusCode: 0, headers: undefined, body: undefined }
      const answer = (record) => {
        if (record === undefined) {
          request.floorKey = recordKey
          request.floorRecord = claimed
          reply.header('expires', new Date(Date.now() + 86_400_000).toUTCString())
          return handler.call(this, request, reply)
        }
        if (record.fingerprint !== fingerprint) return reply.code(422).send()
        if (!record.done) return reply.code(409).send()
        return reply.code(record.statusCode).headers(record.headers).send(record.body)
      }
      const found = records.claim(recordKey, claimed)
      return found instanceof Promise ? found.then(answer) : answer(found)
    }
  }
}

function mapRecords () {
  const records = new Map()
  return {
    claim (key, record) {
      const found = records.get(key)
      if (found === undefined) records.set(key, record)
      return found
    },
    save () {}
  }
}

function redisRecords (client) {
  return {
    async claim (key, record) {
      const found = await client.set(key, JSON.stringify(record), 'PX', 86_400_000, 'NX', 'GET')
      return found === null ? undefined : JSON.parse(found)
    },
    async save (key, record) {
      await client.set(key, JSON.stringify(record), 'PX', 86_400_000)
    }
  }
}

// `node-idempotency-redis`: @node-idempotency/core with its Redis adapter (node-redis), the way
// its README wires it to a framework: the request before the handler, the response at onSend.
async function nodeIdempotencyRoute (handler) {
  const storage = new RedisStorageAdapter({ url: `redis://127.0.0.1:${process.env.BENCH_REDIS_PORT}` })
  await storage.connect()
  app.addHook('onClose', async () => { await storage.disconnect() })
  const idempotency = new Idempotency(storage, { cacheTTLMS: 86_400_000 })
  const asked = (request) => ({ headers: request.headers, body: request.body, path: request.url, method: request.method })
  app.decorateRequest('replayed', false)
  return {
    async preHandler (request, reply) {
      try {
        const response = await idempotency.onRequest(asked(request))
        if (response === undefined) return
        request.replayed = true
        return reply.code(response.statusCode).headers(response.headers).send(response.body)
      } catch (error) {
        if (!(error instanceof IdempotencyError)) throw error
        return reply.code(error.code === 'REQUEST_IN_PROGRESS' ? 409 : 422).send()
      }
    },
    async onSend (request, reply, payload) {
      if (request.headers['idempotency-key'] === undefined || request.replayed || reply.statusCode >= 400) return payload
      await idempotency.onResponse(asked(request), { statusCode: reply.statusCode, headers: reply.getHeaders(), body: payload })
      return payload
    },
    handler
  }
}

function redisClient () {
  const client = new Redis({ host: '127.0.0.1', port: Number(process.env.BENCH_REDIS_PORT), enableAutoPipelining: process.env.BENCH_AUTOPIPELINING === '1' })
  app.addHook('onClose', async () => { client.disconnect() })
  return client
}

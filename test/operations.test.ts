import t from 'tap'
import { Redis } from 'ioredis'
import pg from 'pg'
import { PostgresStore, RedisStore, type IdempotencyStore, type NewRecord } from '../lib/index.js'
import { requirePostgres, startPostgres } from './helpers/postgres-server.js'
import { redisCommand, requireRedis, startRedis } from './helpers/redis-server.js'

function halted (store: IdempotencyStore, key: string, index: number): Promise<unknown> {
  const record: NewRecord = { fingerprint: 'f', owner: `o-${key}`, expiresAt: Date.now() + 60_000, lease: 60_000, takeOverExpiredLease: false, createdAt: Date.now() + index }
  return Promise.resolve(store.insert(key, record)).then(() => store.update(key, record.owner, { state: 'halted', expiresAt: Date.now() + 60_000 }))
}

t.test('Redis list finds records under an ioredis keyPrefix, and passes over values it did not write', async (t) => {
  if (!requireRedis(t)) return
  const server = await startRedis()
  const client = new Redis({ host: '127.0.0.1', port: server.port, keyPrefix: 'app:' })
  t.teardown(async () => {
    client.disconnect()
    await server.stop()
  })
  const store = new RedisStore({ client, prefix: 'idem' })
  for (const [index, key] of ['a', 'b'].entries()) await halted(store, key, index)
  await redisCommand(server.port, 'SET', 'app:idemforeign', 'not a record')
  await redisCommand(server.port, 'HSET', 'app:idemhash', 'field', 'value')
  const listed = await (store.list as NonNullable<IdempotencyStore['list']>)({ limit: 10 })
  t.strictSame(listed.records.map((entry) => entry.key).sort(), ['a', 'b'])
  t.equal(await (store.remove as NonNullable<IdempotencyStore['remove']>)('a'), true, 'the listed key names the record')
  // The connection fails after the SCAN, as the records are read: the listing fails, rather than
  // leave them out.
  ;(client as unknown as { idempotencyStepsBuffer: () => Promise<never> }).idempotencyStepsBuffer = async () => { throw new Error('Connection is closed.') }
  await t.rejects(async () => await (store.list as NonNullable<IdempotencyStore['list']>)({ limit: 10 }), /Connection is closed/, 'a store it cannot read fails the listing')
})

t.test('PostgreSQL list pages the same whatever the session\'s DateStyle and time zone', async (t) => {
  if (!requirePostgres(t)) return
  const server = await startPostgres()
  const pool = new pg.Pool({ connectionString: server.connectionString, max: 1, options: '-c DateStyle=SQL,DMY -c TimeZone=Asia/Kolkata' })
  t.teardown(async () => {
    await pool.end()
    await server.destroy()
  })
  const store = new PostgresStore({ pool, table: 'datestyle_requests', createTable: true })
  const keys = ['a', 'b', 'c', 'd', 'e']
  for (const [index, key] of keys.entries()) await halted(store, key, index)
  const seen: string[] = []
  let cursor: string | undefined
  for (let page = 0; page < 20; page++) {
    const listed = await store.list({ limit: 2, cursor })
    seen.push(...listed.records.map((entry) => entry.key))
    cursor = listed.cursor
    if (cursor === undefined) break
  }
  t.strictSame(seen, keys, 'every record once, oldest first')
})

t.test('a Redis record written before records kept their origin still reads, with its lease', async (t) => {
  if (!requireRedis(t)) return
  const server = await startRedis()
  const client = new Redis({ host: '127.0.0.1', port: server.port })
  t.teardown(async () => {
    client.disconnect()
    await server.stop()
  })
  const store = new RedisStore({ client })
  const expiresAt = Date.now() + 60_000
  const leaseEnd = Date.now() + 30_000
  // processing: <state>\n<expiresAt>\n<fingerprint length>\n<fingerprint><lease end>\n<owner>, no origin.
  await redisCommand(server.port, 'SET', 'idem:old', `p\n${expiresAt}\n2\nfp${leaseEnd}\nowner-1`)
  const record = await store.lookup('old')
  t.match(record, { state: 'processing', fingerprint: 'fp', expiresAt, leaseExpiresAt: leaseEnd, leaseExpired: false })
  t.equal(record?.identity, undefined)
  t.equal(await store.update('old', 'owner-1', { state: 'halted', expiresAt }), true, 'its owner still settles it')
  t.match(await store.lookup('old'), { state: 'halted', identity: undefined })
})

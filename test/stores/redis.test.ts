import t from 'tap'
import { Cluster, Redis } from 'ioredis'
import { RedisStore, type IdempotencyStore } from '../../lib/index.js'
import { runConformance } from './conformance.js'
import { requireRedis, startRedis, startRedisCluster, type RedisClusterServers, type RedisServer } from '../helpers/redis-server.js'
import { sleep } from '../helpers/timing.js'

if (requireRedis(t)) {
  let server: RedisServer
  let cluster: RedisClusterServers
  t.before(async () => {
    server = await startRedis()
    cluster = await startRedisCluster()
  })
  t.teardown(async () => {
    await server.stop()
    await cluster.stop()
  })

  const clients = new WeakMap<IdempotencyStore, { disconnect: () => void }>()

  runConformance(t, {
    name: 'redis',
    create: async () => {
      const client = new Redis({ host: '127.0.0.1', port: server.port })
      const store = new RedisStore({ client })
      clients.set(store, client)
      return store
    },
    now: () => Date.now(),
    advance: sleep,
    destroy: async (store) => { clients.get(store)?.disconnect() },
    pruneCount: 'any'
  })

  runConformance(t, {
    name: 'redis cluster',
    create: async () => {
      const client = new Cluster(cluster.nodes)
      const store = new RedisStore({ client, prefix: 'cluster:' })
      clients.set(store, client)
      return store
    },
    now: () => Date.now(),
    advance: sleep,
    destroy: async (store) => { clients.get(store)?.disconnect() },
    pruneCount: 'any'
  })

  t.test('spreads records over the cluster\'s nodes', async (t) => {
    const client = new Cluster(cluster.nodes)
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'spread:' })
    for (let index = 0; index < 30; index++) {
      await store.insert(`key-${index}`, { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 60_000, lease: 1000, takeOverExpiredLease: false })
    }
    const perNode = await Promise.all(client.nodes('master').map(async (node) => (await node.keys('spread:*')).length))
    t.equal(perNode.reduce((sum, count) => sum + count, 0), 30)
    t.ok(perNode.filter((count) => count > 0).length >= 2, `keys per node: ${perNode.join(', ')}`)
  })

  t.test('fails a call that Redis does not answer within the timeout, and leaves no record behind', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    const admin = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => { client.disconnect(); admin.disconnect() })
    const store = new RedisStore({ client, timeout: 50, prefix: 'slow:' })
    await store.lookup('warm')
    // DEBUG SLEEP blocks the server: the insert queues behind it and times out
    const blocked = admin.call('DEBUG', 'SLEEP', '0.3')
    await sleep(20)
    const started = Date.now()
    const error = await store.insert('late', { fingerprint: 'f', owner: 'late-owner', expiresAt: Date.now() + 60_000, lease: 60_000, takeOverExpiredLease: false })
      .then(() => undefined, (failure: unknown) => failure as Error)
    t.match(error?.message, /redis insert timed out after 50 ms/)
    t.ok(Date.now() - started < 200, 'failed within the timeout')
    const lookupError = await store.lookup('late').then(() => undefined, (failure: unknown) => failure as Error)
    t.match(lookupError?.message, /redis lookup timed out after 50 ms/)
    await blocked
    await sleep(50)
    t.equal(await store.lookup('late'), undefined, 'the late insert was undone by the delete sent after it')
  })

  t.test('passes on the error Redis answers with', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    await client.set('wrong:type', 'a string, not a hash')
    const store = new RedisStore({ client, prefix: 'wrong:' })
    const error = await store.insert('type', { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 1000, lease: 1000, takeOverExpiredLease: false })
      .then(() => undefined, (failure: unknown) => failure as Error)
    t.match(error?.message, /WRONGTYPE/)
  })

  t.test('fails at once while the client is reconnecting', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port, lazyConnect: true })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client })
    Object.defineProperty(client, 'status', { value: 'reconnecting', configurable: true })
    const error = await store.lookup('k').then(() => undefined, (failure: unknown) => failure as Error)
    t.equal(error?.message, 'redis lookup failed: the client is reconnecting')
  })

  t.test('prune has nothing to do: Redis expires records', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    t.equal(await new RedisStore({ client }).prune(), 0)
  })
}

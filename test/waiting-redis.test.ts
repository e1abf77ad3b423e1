import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import { Cluster, Redis } from 'ioredis'
import idempotency, { RedisStore, type IdempotencyOptions } from '../lib/index.js'
import { redisCommand, requireRedis, startRedis, startRedisCluster, type RedisServer } from './helpers/redis-server.js'
import { deferred, key, sleep } from './helpers/timing.js'
import { blockingOrders, outageWhileWaiting, waiters, type BlockingOrders } from './helpers/waiting.js'

interface Setup extends BlockingOrders {
  server: RedisServer
  app: FastifyInstance
}

// One app on a private Redis, whose first request with a key runs until `finish`.
async function setup (t: Test, options: IdempotencyOptions = {}, keyPrefix?: string): Promise<Setup> {
  const server = await startRedis()
  const client = new Redis({ host: '127.0.0.1', port: server.port, maxRetriesPerRequest: 1, ...(keyPrefix === undefined ? {} : { keyPrefix }) })
  client.on('error', () => {})
  const app = Fastify()
  await app.register(idempotency, { store: new RedisStore({ client, timeout: 500 }), wait: 10_000, ...options })
  t.teardown(async () => {
    await app.close()
    client.disconnect()
    await server.stop()
  })
  return { server, app, ...blockingOrders(app) }
}

t.test('Redis publishes the end of a record a duplicate waits for, and nothing for one nobody waits for', async (t) => {
  if (!requireRedis(t)) return
  const { server, app, started, finish, send } = await setup(t)
  const listener = new Redis({ host: '127.0.0.1', port: server.port })
  t.teardown(() => { listener.disconnect() })
  const told: string[] = []
  listener.on('pmessage', (_pattern: string, channel: string) => { told.push(channel) })
  await listener.psubscribe('idem:*')

  // Nobody waits: its end is not published.
  finish()
  t.equal((await send('alone')).statusCode, 201)
  const first = await Promise.resolve(app.idempotency.find({ method: 'POST', route: '/orders', key: 'alone' }))
  t.equal(first?.state, 'completed')

  // A duplicate waits for another key: its end is.
  const other = await setup(t)
  const otherListener = new Redis({ host: '127.0.0.1', port: other.server.port })
  t.teardown(() => { otherListener.disconnect() })
  const otherTold: string[] = []
  otherListener.on('pmessage', (_pattern: string, channel: string) => { otherTold.push(channel) })
  await otherListener.psubscribe('idem:*')
  const running = other.send('waited')
  await other.started
  const duplicate = other.send('waited')
  await waiters(other.app, 1)
  // The mark is set once the subscription is.
  while ((await redisCommand(other.server.port, 'GET', `idem:${other.app.idempotency.keyOf({ method: 'POST', route: '/orders', key: 'waited' })}`) as string)[0] !== 'P') await sleep(5)
  other.finish()
  t.equal((await running).statusCode, 201)
  const replay = await duplicate
  t.equal(replay.statusCode, 201)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  const record = (await Promise.resolve(other.app.idempotency.find({ method: 'POST', route: '/orders', key: 'waited' })))?.record
  while (otherTold.length === 0) await sleep(5)
  t.strictSame(otherTold, [`idem:${record as string}`], 'one message, on the channel named by the storage key (a digest)')
  t.strictSame(told, [], 'a record nobody waited for published nothing')
  t.equal(other.runs(), 1)
  await started
})

t.test('a waiter survives its subscription being killed, and gets the replay, under an ioredis keyPrefix too', async (t) => {
  if (!requireRedis(t)) return
  const { server, app, runs, started, finish, send } = await setup(t, {}, 'app:')
  const running = send('killed')
  await started
  const duplicate = send('killed')
  await waiters(app, 1)
  const storageKey = `app:idem:${app.idempotency.keyOf({ method: 'POST', route: '/orders', key: 'killed' })}`
  while ((await redisCommand(server.port, 'GET', storageKey) as string)[0] !== 'P') await sleep(5)
  t.equal(await redisCommand(server.port, 'CLIENT', 'KILL', 'TYPE', 'pubsub'), '1', 'the subscriber connection is dropped')
  // ioredis reconnects and subscribes again, once it is ready: every waiter is told to look again.
  while (!(await redisCommand(server.port, 'PUBSUB', 'CHANNELS') as string[]).includes(storageKey)) await sleep(5)
  finish()
  t.equal((await running).statusCode, 201)
  const replay = await duplicate
  t.equal(replay.statusCode, 201, 'the replay, by a later look')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal(runs(), 1)
})

t.test('a Redis outage while a duplicate waits answers 503, and the app recovers without a restart', async (t) => {
  if (!requireRedis(t)) return
  const waiting = await setup(t)
  await outageWhileWaiting(t, waiting, waiting.server, 'Redis')
})

t.test('a Redis client that cannot open a connection of its own leaves waiters to look on their own', async (t) => {
  const store = new RedisStore({ client: { defineCommand () {}, status: 'ready' } })
  const unwatch = store.watch('k', () => { t.fail('never told') })
  t.equal(typeof unwatch, 'function')
  unwatch()
  store.close()
})

t.test('two listeners on one key share its subscription, which ends with the last', async (t) => {
  if (!requireRedis(t)) return
  const server = await startRedis()
  const client = new Redis({ host: '127.0.0.1', port: server.port })
  const store = new RedisStore({ client })
  t.teardown(async () => {
    store.close()
    client.disconnect()
    await server.stop()
  })
  let told = 0
  const both = deferred()
  const tell = (): void => {
    if (++told === 2) both.resolve()
  }
  const first = store.watch('shared', () => { tell() })
  const second = store.watch('shared', () => { tell() })
  await both.promise
  t.equal(told, 2, 'each is told once the subscription and the mark are made')
  const channels = async () => await redisCommand(server.port, 'PUBSUB', 'CHANNELS')
  t.strictSame(await channels(), ['idem:shared'])
  first()
  t.strictSame(await channels(), ['idem:shared'], 'still subscribed for the second')
  second()
  while ((await channels() as string[]).length > 0) await sleep(5)
  t.pass('unsubscribed once the last left')
})

t.test('duplicates wait for the first response on a 3-master Redis Cluster, told on the key\'s sharded channel', async (t) => {
  if (!requireRedis(t)) return
  const servers = await startRedisCluster(3)
  const client = new Cluster(servers.nodes)
  const app = Fastify()
  await app.register(idempotency, { store: new RedisStore({ client }), wait: 5000 })
  t.teardown(async () => {
    await app.close()
    client.disconnect()
    await servers.stop()
  })
  let runs = 0
  const finish = deferred()
  app.post('/orders', { config: { idempotency: true } }, async () => {
    runs++
    await finish.promise
    return { runs }
  })
  const second = deferred()
  app.post('/refunds', { config: { idempotency: true } }, async () => {
    await second.promise
    return { refunded: true }
  })
  const sent = Array.from({ length: 20 }, async () => await app.inject({ method: 'POST', url: '/orders', headers: key('clustered'), payload: {} }))
  await waiters(app, 19)
  const channel = `idem:${app.idempotency.keyOf({ method: 'POST', route: '/orders', key: 'clustered' })}`
  const shardChannels = async () => await Promise.all(servers.nodes.map(async (node) => await redisCommand(node.port, 'PUBSUB', 'SHARDCHANNELS') as string[]))
  let subscribed = await shardChannels()
  while (!subscribed.some((channels) => channels.includes(channel))) {
    await sleep(5)
    subscribed = await shardChannels()
  }
  t.equal(subscribed.filter((channels) => channels.includes(channel)).length, 1, 'one node, the key\'s, holds the sharded channel')
  const owner = servers.nodes[subscribed.findIndex((channels) => channels.includes(channel))] as { port: number }
  t.strictSame(await Promise.all(servers.nodes.map(async (node) => await redisCommand(node.port, 'PUBSUB', 'CHANNELS'))), [[], [], []], 'no broadcast channel')
  while ((await redisCommand(owner.port, 'GET', channel) as string)[0] !== 'P') await sleep(5)
  finish.resolve()
  const answers = await Promise.all(sent)
  t.equal(runs, 1)
  t.strictSame([...new Set(answers.map((answer) => `${answer.statusCode} ${answer.body}`))], ['200 {"runs":1}'], 'no 409: all got the first response')

  // A killed sharded subscriber: the waiter still gets the replay, by a later look.
  const running = app.inject({ method: 'POST', url: '/refunds', headers: key('killed'), payload: {} })
  const duplicate = app.inject({ method: 'POST', url: '/refunds', headers: key('killed'), payload: {} })
  await waiters(app, 1)
  const killed = `idem:${app.idempotency.keyOf({ method: 'POST', route: '/refunds', key: 'killed' })}`
  let node: { port: number } | undefined
  while (node === undefined) {
    const channels = await shardChannels()
    node = servers.nodes[channels.findIndex((names) => names.includes(killed))]
    if (node === undefined) await sleep(5)
  }
  t.equal(await redisCommand(node.port, 'CLIENT', 'KILL', 'TYPE', 'pubsub'), '1', 'the key\'s subscriber connection is dropped')
  second.resolve()
  t.equal((await running).statusCode, 200)
  const replay = await duplicate
  t.equal(replay.statusCode, 200)
  t.equal(replay.headers['idempotent-replayed'], 'true')
})

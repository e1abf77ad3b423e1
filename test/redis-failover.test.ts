import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import idempotency, { RedisStore } from '../lib/index.js'
import { redisCommand, requireRedis, startRedisSentinel, type RedisSentinelServers } from './helpers/redis-server.js'
import { deferred, key, sleep } from './helpers/timing.js'

interface Setup {
  servers: RedisSentinelServers
  app: FastifyInstance
  /** Runs of the handler, by idempotency key. */
  runs: Map<string, number>
  /** Keys whose handler waits until `release`. */
  held: Set<string>
  release: () => void
  send: (clientKey: string) => Promise<Awaited<ReturnType<FastifyInstance['inject']>>>
}

// An app whose store reaches its Redis through three Sentinels.
async function sentinelApp (t: Test, replicas: number): Promise<Setup> {
  const servers = await startRedisSentinel()
  const client = new Redis({ sentinels: servers.sentinels, name: servers.name, maxRetriesPerRequest: 1 })
  client.on('error', () => {})
  const app = Fastify()
  await app.register(idempotency, { store: new RedisStore({ client, replicas, timeout: 1000 }) })
  const runs = new Map<string, number>()
  const held = new Set<string>()
  const released = deferred()
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    const clientKey = request.headers['idempotency-key'] as string
    const run = (runs.get(clientKey) ?? 0) + 1
    runs.set(clientKey, run)
    if (held.has(clientKey)) await released.promise
    return reply.code(201).send({ key: clientKey, run })
  })
  t.teardown(async () => {
    released.resolve()
    await app.close()
    client.disconnect()
    await servers.stop()
  })
  return { servers, app, runs, held, release: released.resolve, send: async (clientKey) => await app.inject({ method: 'POST', url: '/orders', headers: key(clientKey), payload: { amount: 1 } }) }
}

// The Sentinels promote a replica, and the app's client reaches it: a fresh key runs again.
async function failedOver (t: Test, { servers, send }: Setup): Promise<void> {
  while (await servers.primary() === servers.servers[0].port) await sleep(50)
  for (let attempt = 0; ; attempt++) {
    if ((await send(`probe-${attempt}`)).statusCode === 201) break
    await sleep(50)
  }
  t.pass('the replica was promoted and the store reaches it')
}

// Keys in flight and completed, the primary SIGKILLed right after they were acknowledged.
async function killedAfterAcknowledgement (setup: Setup, keys: number): Promise<{ completed: Map<string, string>, running: string[] }> {
  const completed = new Map<string, string>()
  for (let index = 0; index < keys; index++) {
    const answer = await setup.send(`done-${index}`)
    if (answer.statusCode !== 201) throw new Error(`done-${index}: ${answer.statusCode} ${answer.body}`)
    completed.set(`done-${index}`, answer.body)
  }
  const running = ['running-0', 'running-1', 'running-2']
  for (const clientKey of running) setup.held.add(clientKey)
  const inFlight = running.map((clientKey) => setup.send(clientKey))
  // Their handlers run: their inserts were acknowledged.
  while (running.some((clientKey) => !setup.runs.has(clientKey))) await sleep(1)
  await setup.servers.servers[0].kill()
  setup.release()
  await Promise.all(inFlight)
  return { completed, running }
}

t.test('with replicas: 1, a failover loses no acknowledged insert or completion: no handler runs twice', async (t) => {
  if (!requireRedis(t)) return
  const setup = await sentinelApp(t, 1)
  const { completed, running } = await killedAfterAcknowledgement(setup, 20)
  await failedOver(t, setup)
  for (const [clientKey, body] of completed) {
    const replay = await setup.send(clientKey)
    t.equal(replay.statusCode, 201, `${clientKey} replays`)
    t.equal(replay.headers['idempotent-replayed'], 'true')
    t.equal(replay.body, body, 'byte for byte')
  }
  for (const clientKey of running) {
    const retry = await setup.send(clientKey)
    // Its completion reached the promoted replica, or the record there is still the running one.
    t.ok(retry.statusCode === 201 ? retry.headers['idempotent-replayed'] === 'true' : retry.statusCode === 409 || retry.statusCode === 500,
      `${clientKey}: ${retry.statusCode}, not a second run`)
  }
  t.ok([...setup.runs].every(([, count]) => count === 1), 'every handler ran once')
})

t.test('with replicas: 0, a retry may run again when the primary dies before its replica has the record', async (t) => {
  if (!requireRedis(t)) return
  const setup = await sentinelApp(t, 0)
  const [primary, ...replicas] = setup.servers.servers
  // The replicas stop reading, and a large write fills the links to them: what follows stays in
  // the primary's buffers, acknowledged to the app but on no replica.
  for (const replica of replicas) replica.pause()
  await redisCommand(primary.port, 'SET', 'filler', 'x'.repeat(48 * 1024 * 1024))
  const answers = await Promise.all(Array.from({ length: 5 }, async (_, index) => await setup.send(`lost-${index}`)))
  t.strictSame([...new Set(answers.map((answer) => answer.statusCode))], [201], 'acknowledged without waiting for the replica')
  await primary.kill()
  for (const replica of replicas) replica.resume()
  await failedOver(t, setup)
  for (let index = 0; index < 5; index++) await setup.send(`lost-${index}`)
  const ranAgain = [...setup.runs].filter(([clientKey, count]) => clientKey.startsWith('lost-') && count === 2).length
  t.equal(ranAgain, 5, 'every record lost with the primary ran again: the window replicas closes')
})

t.test('with replicas: 1 and the replica not answering, an insert is refused with 503 before the handler runs, and holds no key', async (t) => {
  if (!requireRedis(t)) return
  const setup = await sentinelApp(t, 1)
  const [, ...replicas] = setup.servers.servers
  const pause = () => { for (const replica of replicas) replica.pause() }
  const resume = () => { for (const replica of replicas) replica.resume() }
  pause()
  const refused = await setup.send('refused')
  t.equal(refused.statusCode, 503)
  t.equal(refused.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
  t.equal(setup.runs.get('refused'), undefined, 'the handler did not run')
  resume()
  let retry = await setup.send('refused')
  for (let attempt = 0; attempt < 100 && retry.statusCode !== 201; attempt++) {
    await sleep(50)
    retry = await setup.send('refused')
  }
  t.equal(retry.statusCode, 201, 'once the replica answers, the retry runs')
  t.equal(setup.runs.get('refused'), 1, 'once')

  // A completion the replica does not acknowledge is a failed save: the retry never runs again.
  setup.held.add('unsaved')
  const running = setup.send('unsaved')
  while (!setup.runs.has('unsaved')) await sleep(1)
  pause()
  setup.release()
  t.equal((await running).statusCode, 201, 'the client gets its response')
  resume()
  await setup.send('unsaved')
  t.equal(setup.runs.get('unsaved'), 1, 'its retry does not run it again')
})

t.test('replicas is refused on a Cluster, naming the option', async (t) => {
  t.throws(() => new RedisStore({ client: { defineCommand () {}, status: 'ready', isCluster: true }, replicas: 1 }), {
    code: 'FST_IDEMPOTENCY_INVALID_OPTION',
    message: /RedisStore option replicas is not supported on a Redis Cluster/
  })
  t.throws(() => new RedisStore({ client: { defineCommand () {}, status: 'ready' }, replicas: -1 }), { code: 'FST_IDEMPOTENCY_INVALID_OPTION', message: /replicas/ })
})

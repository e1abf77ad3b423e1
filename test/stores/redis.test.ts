import { EventEmitter } from 'node:events'
import t, { type Test } from 'tap'
import { Cluster, Redis } from 'ioredis'
import { RedisStore, type IdempotencyStore } from '../../lib/index.js'
import { runConformance } from './conformance.js'
import { requireRedis, startRedis, startRedisCluster, type RedisClusterServers, type RedisServer } from '../helpers/redis-server.js'
import { startProxy } from '../helpers/proxy.js'
import { sleep } from '../helpers/timing.js'

const record = (owner: string, expiresAt = Date.now() + 60_000) => ({ fingerprint: 'f', owner, expiresAt, lease: 60_000, takeOverExpiredLease: false })

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

  /** A store with a 50 ms timeout and a warm connection, and an admin client to block Redis with. */
  async function storeWithAdmin (t: Test, prefix: string): Promise<{ client: Redis, admin: Redis, store: RedisStore }> {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    const admin = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => { client.disconnect(); admin.disconnect() })
    const store = new RedisStore({ client, timeout: 50, prefix })
    await store.lookup('warm')
    return { client, admin, store }
  }

  /**
   * DEBUG SLEEP blocks the server: what is sent meanwhile queues behind it. Answers once Redis is
   * blocked, with the sleep's own promise, which settles when Redis is free again.
   */
  async function blockRedis (admin: Redis, seconds: number): Promise<{ blocked: Promise<unknown> }> {
    const blocked = admin.call('DEBUG', 'SLEEP', String(seconds))
    await sleep(20)
    return { blocked }
  }

  t.test('fails a call that Redis does not answer within the timeout, and leaves no record behind', async (t) => {
    const { admin, store } = await storeWithAdmin(t, 'slow:')
    const { blocked } = await blockRedis(admin, 0.3)
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

  t.test('a call that timed out stays failed with the timeout, whatever Redis answers later', async (t) => {
    const { admin, store } = await storeWithAdmin(t, 'late-error:')
    await admin.hset('late-error:type', 'a', 'hash, not a string')
    const { blocked } = await blockRedis(admin, 0.2)
    const error = await store.lookup('type').then(() => undefined, (failure: unknown) => failure as Error)
    t.equal(error?.message, 'redis lookup timed out after 50 ms', 'not the WRONGTYPE Redis answers after the timeout')
    await blocked
    t.match(await store.lookup('type').then(() => undefined, (failure: unknown) => (failure as Error).message), /WRONGTYPE/,
      'the same call answered in time fails with the error')
  })

  t.test('a call that timed out stays failed with the timeout when its connection closes later', async (t) => {
    const { client, admin, store } = await storeWithAdmin(t, 'late-close:')
    const { blocked } = await blockRedis(admin, 0.2)
    const sent = client as unknown as { idempotencyStepsBuffer: (...arguments_: unknown[]) => Promise<unknown> }
    const call = sent.idempotencyStepsBuffer
    let late: Promise<unknown> | undefined
    sent.idempotencyStepsBuffer = (...arguments_: unknown[]) => {
      late = call.apply(client, arguments_)
      return late
    }
    const error = await store.lookup('k').then(() => undefined, (failure: unknown) => failure as Error)
    t.equal(error?.message, 'redis lookup timed out after 50 ms')
    // Closed at once, not ended: an ended socket still receives Redis's answer.
    client.disconnect()
    ;(client as unknown as { stream: { destroy: () => void } }).stream.destroy()
    const closed = await (late as Promise<unknown>).then(() => undefined, (failure: unknown) => (failure as Error).message)
    t.match(closed, /Connection is closed/, 'the call itself failed after the timeout, and nothing else came of it')
    await blocked
  })

  t.test('passes on the error Redis answers with', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    await client.hset('wrong:type', 'a', 'hash, not a string')
    const store = new RedisStore({ client, prefix: 'wrong:' })
    const error = await store.insert('type', { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 1000, lease: 1000, takeOverExpiredLease: false })
      .then(() => undefined, (failure: unknown) => failure as Error)
    t.match(error?.message, /WRONGTYPE/)
  })

  t.test('fails on a string value that it did not write, rather than reading a record into it', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'foreign:' })
    // An unknown state, no expiry, no fingerprint length, a negative one, a fingerprint longer than
    // the value, no status, no headers.
    const values = ['x\n1\n1\nf', 'c\n', 'c\n1\n9', 'h\n1\n-1\n', 'c\n1\n9\nf', 'c\n1\n1\nf', 'c\n1\n1\nf200\n{}']
    for (const [index, value] of values.entries()) await client.set(`foreign:${index}`, value)
    for (const [index, value] of values.entries()) {
      const error = await store.lookup(String(index)).then(() => undefined, (failure: unknown) => failure as Error)
      t.equal(error?.message, 'redis record is not one this store wrote', JSON.stringify(value))
    }
  })

  t.test('fails at once while the client is reconnecting', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port, lazyConnect: true })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client })
    Object.defineProperty(client, 'status', { value: 'reconnecting', configurable: true })
    const error = await store.lookup('k').then(() => undefined, (failure: unknown) => failure as Error)
    t.equal(error?.message, 'redis lookup failed: the client is reconnecting')
  })

  /**
   * Counts the script calls a client sends. Only EVALSHA counts: a node that has not loaded the
   * script yet answers NOSCRIPT, and ioredis sends the same call again as EVAL.
   */
  function countingClient (client: Redis | Cluster): { calls: () => number } {
    let calls = 0
    const patched = client as unknown as { sendCommand: (...arguments_: unknown[]) => unknown }
    const sendCommand = patched.sendCommand.bind(client)
    patched.sendCommand = (...arguments_: unknown[]) => {
      if ((arguments_[0] as { name: string }).name === 'evalsha') calls++
      return sendCommand(...arguments_)
    }
    return { calls: () => calls }
  }

  t.test('an insert whose answer was lost with its connection holds no key once the client is back', async (t) => {
    const proxy = await startProxy(server.port)
    // Reconnecting takes longer than the timeout: the inserts time out while the client is down.
    const client = new Redis({ host: '127.0.0.1', port: proxy.port, retryStrategy: () => 1000 })
    const admin = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(async () => { client.disconnect(); admin.disconnect(); await proxy.close() })
    const store = new RedisStore({ client, timeout: 500, prefix: 'lost:' })
    await store.lookup('warm')
    proxy.dropReplies()
    const inserts = [store.insert('k', record('first')), store.insert('k2', record('second'))]
    for (let attempt = 0; attempt < 50 && await admin.exists('lost:k', 'lost:k2') < 2; attempt++) await sleep(5)
    t.match(await admin.mget('lost:k', 'lost:k2'), [/^p\n/, /^p\n/], 'Redis ran the inserts; their answers are lost')
    await proxy.cut()
    for (const insert of inserts) await t.rejects(insert, /redis insert timed out after 500 ms/)
    t.equal(client.status, 'reconnecting', 'they timed out while the client was reconnecting')
    await proxy.heal()
    for (let attempt = 0; attempt < 300 && (client.status !== 'ready' || await admin.exists('lost:k', 'lost:k2') > 0); attempt++) await sleep(10)
    t.equal(client.status, 'ready')
    t.same(await admin.mget('lost:k', 'lost:k2'), [null, null], 'deleted once the client was ready, without waiting for another operation')
    t.same(await store.insert('k', record('retry')), { inserted: true }, 'a retry runs')
  })

  t.test('a delete of a lost insert is sent again when its own call fails too', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, timeout: 100, prefix: 'undo:' })
    await store.lookup('warm')
    const counter = countingClient(client)
    const scripted = client as unknown as { idempotencyStepsBuffer: (...arguments_: unknown[]) => Promise<unknown> }
    const call = scripted.idempotencyStepsBuffer
    const sent: unknown[][] = []
    let failures = 2
    scripted.idempotencyStepsBuffer = (...arguments_: unknown[]) => {
      sent.push(arguments_)
      // Redis runs each call; the first two answers are lost with their connection.
      const answer = call.apply(client, arguments_)
      return failures-- > 0 ? answer.then(() => { throw new Error('Connection is closed.') }) : answer
    }
    await t.rejects(store.insert('k', record('first')), /Connection is closed/)
    for (let attempt = 0; attempt < 100 && sent.length < 3; attempt++) await sleep(10)
    t.same(sent.map((arguments_) => [arguments_[0], arguments_[1], arguments_[2]]), [
      [1, 'undo:k', 'i'], [1, 'undo:k', 'd'], [1, 'undo:k', 'd']
    ], 'the insert, then its delete in a call of its own, sent again a timeout after that call failed too')
    t.equal(await client.get('undo:k'), null, 'deleted')
    const [inserted] = await Promise.all([store.insert('k', record('retry')), store.insert('other', record('other'))])
    t.same(inserted, { inserted: true })
    t.equal(counter.calls(), 4)
  })

  t.test('operations that arrive in one turn of the event loop share one script call', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'together:' })
    await store.lookup('warm')
    const counter = countingClient(client)
    const inserted = await Promise.all(Array.from({ length: 10 }, async (_, index) => await store.insert(`k${index}`, record(`o${index}`))))
    t.ok(inserted.every((result) => result.inserted), 'every insert took effect')
    t.equal(counter.calls(), 1, 'ten inserts, one call')
    const mixed = await Promise.all([
      store.update('k0', 'o0', { state: 'completed', response: { statusCode: 201, headers: {}, body: 'zero' }, expiresAt: Date.now() + 60_000 }),
      store.update('k1', 'o1', { state: 'halted', expiresAt: Date.now() + 60_000 }),
      store.update('k2', 'someone else', { state: 'halted', expiresAt: Date.now() + 60_000 }),
      store.delete('k3', 'o3'),
      store.lookup('k4'),
      store.lookup('missing')
    ])
    t.same(mixed.slice(0, 4), [true, true, false, true], 'each step answers for itself')
    t.equal((mixed[4] as { state: string }).state, 'processing')
    t.equal(mixed[5], undefined)
    t.equal(counter.calls(), 2, 'six mixed operations, one more call')
    t.equal((await store.lookup('k0'))?.response?.body.toString(), 'zero')
  })

  t.test('an operation on a key it cannot read fails alone, not the others of its call', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'alone:' })
    await store.lookup('warm')
    await client.hset('alone:hash', 'a', 'another type')
    await client.set('alone:broken', 'p\nnot a record')
    const counter = countingClient(client)
    const outcome = async (operation: Promise<unknown>): Promise<unknown> => await operation.then(
      (value) => value,
      (error: unknown) => (error as Error).message)
    const [before, hash, broken, after] = await Promise.all([
      outcome(store.insert('before', record('o1'))),
      outcome(store.insert('hash', record('o2'))),
      outcome(store.update('broken', 'o3', { state: 'halted', expiresAt: Date.now() + 60_000 })),
      outcome(store.insert('after', record('o4')))
    ])
    t.equal(counter.calls(), 1, 'one call')
    t.same(before, { inserted: true })
    t.match(hash, /^WRONGTYPE/)
    t.match(broken, /^ERR not a record of this store: .*nil/, 'a value it did not write')
    t.same(after, { inserted: true })
    t.equal((await store.lookup('after'))?.state, 'processing')
  })

  t.test('a Redis out of memory still answers a key that holds a record, and refuses new ones', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'oom:' })
    const response = { statusCode: 201, headers: {}, body: 'done' }
    await store.insert('done', record('o1'))
    await store.update('done', 'o1', { state: 'completed', response, expiresAt: Date.now() + 60_000 })
    await store.insert('running', { ...record('o2'), lease: 1, takeOverExpiredLease: true })
    await sleep(5)
    const [, policy] = await client.config('GET', 'maxmemory-policy') as string[]
    t.equal(policy, 'noeviction', 'Redis refuses writes rather than evicting')
    t.teardown(async () => { await client.config('SET', 'maxmemory', '0') })
    await client.config('SET', 'maxmemory', '1')
    const replay = await store.insert('done', record('o3'))
    t.match(replay, { inserted: false, record: { state: 'completed', response: { statusCode: 201 } } }, 'a replay needs no write')
    t.equal(replay.inserted ? undefined : replay.record.response?.body.toString(), 'done')
    await t.rejects(store.insert('fresh', record('o4')), /^OOM /, 'a new record is refused with Redis\'s error')
    await t.rejects(store.insert('running', { ...record('o5'), takeOverExpiredLease: true }), /^OOM /,
      'so is taking over a lapsed lease')
    await client.config('SET', 'maxmemory', '0')
    t.equal(await store.lookup('fresh'), undefined, 'nothing was written')
    t.same(await store.insert('fresh', record('o4')), { inserted: true }, 'written once Redis has room again')
  })

  t.test('each record keeps its own headers, whether records share a header object or not', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'headers:' })
    const shared = Object.freeze({ 'content-type': 'application/json', location: '/orders/1' })
    const sets: Array<Record<string, string>> = [shared, shared, { 'content-type': 'text/plain' }, shared, Object.freeze({ 'x-other': 'yes' }), {}]
    for (const [index, headers] of sets.entries()) {
      t.ok(await store.insert(`h${index}`, record(`o${index}`)))
      t.equal(await store.update(`h${index}`, `o${index}`, { state: 'completed', response: { statusCode: 200, headers, body: `b${index}` }, expiresAt: Date.now() + 60_000 }), true)
    }
    for (const index of [0, 1, 2, 2, 3, 4, 5, 0]) {
      const found = await store.lookup(`h${index}`)
      t.same(found?.response?.headers, sets[index], `record ${index}`)
    }
  })

  t.test('a turn with many operations or large bodies sends several calls', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'many:' })
    await store.lookup('warm')
    const counter = countingClient(client)
    await Promise.all(Array.from({ length: 70 }, async (_, index) => await store.insert(`k${index}`, record(`o${index}`))))
    t.equal(counter.calls(), 2, '70 steps: 64 in the first call, 6 in the second')
    const body = Buffer.alloc(600 * 1024, 7)
    const completed = await Promise.all([0, 1, 2].map(async (index) => await store.update(`k${index}`, `o${index}`, {
      state: 'completed', response: { statusCode: 200, headers: {}, body }, expiresAt: Date.now() + 60_000
    })))
    t.same(completed, [true, true, true])
    t.equal(counter.calls(), 5, 'three 600 KiB bodies: one call each, below 1 MiB')
    t.ok(body.equals((await store.lookup('k2'))?.response?.body as Buffer))
  })

  t.test('on a Cluster every operation is a call of its own, as a call may touch one slot only', async (t) => {
    const client = new Cluster(cluster.nodes)
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'slots:' })
    await store.lookup('warm')
    const counter = countingClient(client)
    const inserted = await Promise.all(Array.from({ length: 5 }, async (_, index) => await store.insert(`k${index}`, record(`o${index}`))))
    t.ok(inserted.every((result) => result.inserted))
    t.equal(counter.calls(), 5)
  })

  t.test('a claimed key\'s lease is judged by Redis\'s clock, however far the app\'s clock is off', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    const realNow = Date.now
    t.teardown(() => { Date.now = realNow; client.disconnect() })
    const store = new RedisStore({ client, prefix: 'skew:' })
    // The app's clock an hour ahead: a record it keeps for two minutes, with a lease of 300 ms.
    Date.now = () => realNow() + 3_600_000
    t.same(await store.insert('k', { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + 120_000, lease: 300, takeOverExpiredLease: false }), { inserted: true })
    Date.now = realNow
    const [seconds, micros] = await client.time()
    const redisNow = Number(seconds) * 1000 + Math.floor(Number(micros) / 1000)
    const running = await store.lookup('k')
    t.equal(running?.leaseExpired, false)
    const leaseEnd = running?.leaseExpiresAt as number
    // A script reads PTTL as of its start: a ms of slack.
    t.ok(leaseEnd > redisNow - 300 && leaseEnd <= redisNow + 301, `the lease ends 300 ms after the claim by Redis's clock (${leaseEnd - redisNow} ms from now)`)
    await sleep(400)
    t.match(await store.lookup('k'), { state: 'processing', leaseExpired: true }, 'and lapses then, not an hour later')
    t.match(await store.insert('k', { fingerprint: 'f', owner: 'o2', expiresAt: Date.now() + 120_000, lease: 300, takeOverExpiredLease: true }), { inserted: true, tookOver: true })
    t.match(await store.lookup('k'), { state: 'processing', leaseExpired: false }, 'taken over with a lease of its own')
  })

  t.test('reads a processing record whose lease end is a time, as renewals and the version before write it', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    const store = new RedisStore({ client, prefix: 'absolute:' })
    const [seconds] = await client.time()
    const redisNow = Number(seconds) * 1000
    const expiresAt = redisNow + 60_000
    const origin = JSON.stringify({ createdAt: redisNow - 1000 })
    await client.set('absolute:live', `p\n${expiresAt}\n1\nf${redisNow + 30_000}\nowner-live\n${origin}`, 'PXAT', expiresAt)
    await client.set('absolute:lapsed', `p\n${expiresAt}\n1\nf${redisNow - 30_000}\nowner-lapsed\n${origin}`, 'PXAT', expiresAt)
    t.match(await store.lookup('live'), { state: 'processing', leaseExpired: false, leaseExpiresAt: redisNow + 30_000, createdAt: redisNow - 1000 })
    t.match(await store.lookup('lapsed'), { state: 'processing', leaseExpired: true, leaseExpiresAt: redisNow - 30_000 })
    t.match(await store.insert('live', { ...record('other'), takeOverExpiredLease: true }), { inserted: false, record: { leaseExpired: false } })
    t.match(await store.insert('lapsed', { ...record('other'), takeOverExpiredLease: true }), { inserted: true, tookOver: true })
    t.equal(await store.update('live', 'owner-live', { state: 'completed', response: { statusCode: 201, headers: {}, body: 'done' }, expiresAt }), true,
      'its owner completes it')
    t.equal((await store.lookup('live'))?.response?.body.toString(), 'done')
  })

  t.test('prune has nothing to do: Redis expires records', async (t) => {
    const client = new Redis({ host: '127.0.0.1', port: server.port })
    t.teardown(() => client.disconnect())
    t.equal(await new RedisStore({ client }).prune(), 0)
  })
}

t.test('a client that throws instead of rejecting fails the operations of its call', async (t) => {
  const client = {
    status: 'ready',
    defineCommand () {},
    idempotencyStepsBuffer () { throw new Error('not connected') }
  }
  const store = new RedisStore({ client })
  const failures = await Promise.all([
    store.lookup('a').then(() => undefined, (error: unknown) => (error as Error).message),
    store.delete('b', 'owner').then(() => undefined, (error: unknown) => (error as Error).message)
  ])
  t.same(failures, ['not connected', 'not connected'])
})

/** A client whose calls fail as a dropped connection fails them; it records the keys and time of each call. */
interface LosingClient {
  status: string
  keys: string[][]
  times: number[]
  defineCommand: () => void
  idempotencyStepsBuffer: (...arguments_: unknown[]) => Promise<unknown>
  once?: (event: 'ready', listener: () => void) => unknown
}

/** Without `once`, unless given one: the store then cannot be told when the client is ready. */
function losingClient (once?: LosingClient['once'], failure: () => unknown = () => new Error('Connection is closed.')): LosingClient {
  const client: LosingClient = {
    status: 'ready',
    keys: [],
    times: [],
    defineCommand () {},
    idempotencyStepsBuffer (...arguments_: unknown[]) {
      client.keys.push(arguments_.slice(1, 1 + (arguments_[0] as number)) as string[])
      client.times.push(Date.now())
      return Promise.reject(failure())
    }
  }
  if (once !== undefined) client.once = once
  return client
}

/** Until the client was called with `count` keys in all (or 20 s went by). */
async function calledWith (client: LosingClient, count: number): Promise<void> {
  const deadline = Date.now() + 20_000
  while (client.keys.flat().length < count && Date.now() < deadline) await sleep(10)
}

t.test('deletes of lost inserts are bounded: 16 per call, 5 calls each, none for a record that expired', async (t) => {
  const client = losingClient()
  const store = new RedisStore({ client, prefix: '', timeout: 20 })
  await t.rejects(store.insert('alone', record('o', Date.now() - 1)))
  await sleep(100)
  t.same(client.keys, [['alone']], 'a lost insert whose record expired meanwhile is not deleted')
  client.keys.length = 0
  const inserts = ['expired', ...Array.from({ length: 19 }, (_, index) => `k${index}`)].map(async (key) =>
    await store.insert(key, record(key, Date.now() + (key === 'expired' ? -1 : 60_000))).catch((error: unknown) => (error as Error).message))
  t.same(new Set(await Promise.all(inserts)), new Set(['Connection is closed.']))
  await calledWith(client, 20 + 19 * 5)
  await sleep(100)
  const [first, ...deletes] = client.keys
  t.equal(first?.length, 20, 'the inserts went in one call')
  t.ok(deletes.every((keys) => keys.length <= 16), 'at most 16 deletes per call')
  const sent = new Map<string, number>()
  for (const key of deletes.flat()) sent.set(key, (sent.get(key) ?? 0) + 1)
  t.equal(sent.has('expired'), false, 'no delete for a record that expired meanwhile')
  t.same([...sent.values()], Array.from({ length: 19 }, () => 5), 'each delete was tried in 5 calls, then given up')
})

t.test('a delete whose own call failed is tried again a timeout later, however many deletes wait', async (t) => {
  const client = losingClient()
  const store = new RedisStore({ client, prefix: '', timeout: 200 })
  await Promise.all(Array.from({ length: 17 }, async (_, index) => await store.insert(`k${index}`, record('o')).catch(() => {})))
  await calledWith(client, 17 * 3)
  const tried = new Map<string, number[]>()
  client.keys.forEach((keys, call) => { for (const key of keys) tried.set(key, [...tried.get(key) ?? [], client.times[call] as number]) })
  const gaps = [...tried.values()].flatMap((times) => times.slice(2).map((time, index) => time - (times[index + 1] as number)))
  t.equal(gaps.length, 17, 'every key: its insert, its delete, and the delete again')
  t.ok(gaps.every((gap) => gap >= 190), `a timeout between the tries of a delete: ${Math.min(...gaps)} ms at least`)
})

t.test('no delete follows an insert whose call never left the process', async (t) => {
  const failures: Array<[string, () => unknown, boolean]> = [
    ['no offline queue', () => new Error("Stream isn't writeable and enableOfflineQueue options is false"), false],
    ['gave up reconnecting', () => Object.assign(new Error('Reached the max retries per request limit'), { name: 'MaxRetriesPerRequestError' }), false],
    ['a connection lost', () => new Error('Connection is closed.'), true],
    ['a failure that is not an Error', () => 'closed', true]
  ]
  for (const [name, failure, deleted] of failures) {
    const client = losingClient(undefined, failure)
    const store = new RedisStore({ client, prefix: '', timeout: 20 })
    await t.rejects(store.insert('k', record('o')))
    await sleep(50)
    t.equal(client.keys.length > 1, deleted, `${name}: ${deleted ? 'deleted' : 'no delete'}`)
  }
  let calls = 0
  const thrower = { status: 'ready', defineCommand () {}, idempotencyStepsBuffer () { calls++; throw new Error('not connected') } }
  const store = new RedisStore({ client: thrower, prefix: '' })
  await t.rejects(store.insert('k', record('o')), /not connected/)
  await sleep(50)
  t.equal(calls, 1, 'a client that throws: no delete')
})

t.test('at most 10 000 deletes of lost inserts wait at a time', async (t) => {
  const client = losingClient()
  const store = new RedisStore({ client, prefix: '', timeout: 20 })
  const expiresAt = Date.now() + 60_000
  await Promise.all(Array.from({ length: 10_001 }, async (_, index) => await store.insert(`k${index}`, record('o', expiresAt)).catch(() => {})))
  const inserts = Math.ceil(10_001 / 64)
  await calledWith(client, 10_001 + 10_000 * 5)
  await sleep(100)
  const deleted = client.keys.slice(inserts).flat()
  t.equal(deleted.length, 50_000, 'each of them tried 5 times')
  t.equal(new Set(deleted).size, 10_000)
  t.equal(deleted.includes('k10000'), false, 'the last one found no room')
})

t.test('a delete of a lost insert waits while the client reconnects, then goes before the next call\'s own steps', async (t) => {
  // No `once`: the store cannot be told when the client is back, so the next call takes it.
  const client = losingClient()
  const store = new RedisStore({ client, prefix: '', timeout: 20 })
  const insert = store.insert('k', record('o'))
  client.status = 'reconnecting'
  await t.rejects(insert, /Connection is closed/)
  await sleep(20)
  t.same(client.keys, [['k']], 'nothing is sent while the client reconnects')
  client.status = 'ready'
  await t.rejects(store.lookup('other'))
  t.same(client.keys, [['k'], ['k', 'other']])
})

t.test('a delete of a lost insert goes out when the client tells it is ready, not while it connects', async (t) => {
  const events = new EventEmitter()
  const client = losingClient((event, listener) => events.once(event, listener))
  const store = new RedisStore({ client, prefix: '', timeout: 20 })
  const inserts = [store.insert('k', record('o')), store.insert('k2', record('o'))]
  client.status = 'reconnecting'
  for (const insert of inserts) await t.rejects(insert)
  client.status = 'connect'
  await t.rejects(store.lookup('other'), /Connection is closed/, 'ioredis would queue this call, or fail it without its offline queue')
  t.same(client.keys, [['k', 'k2'], ['other']], 'no delete while the client connects')
  t.equal(events.listenerCount('ready'), 1, 'one listener, however often the store waits')
  client.status = 'ready'
  events.emit('ready')
  await sleep(10)
  t.same(client.keys.at(-1), ['k', 'k2'], 'the deletes went out once it was ready')
})

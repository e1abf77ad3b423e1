import v8 from 'node:v8'
import vm from 'node:vm'
import t from 'tap'
import { InvalidOptionError, MemoryStore, type MemoryStoreOptions, type WarningLogger } from '../../lib/index.js'
import { runConformance } from './conformance.js'

const HOUR = 3_600_000

/** A full garbage collection, for the tests of what the store keeps alive. */
function collectGarbage (): void {
  v8.setFlagsFromString('--expose-gc')
  ;(vm.runInNewContext('gc') as () => void)()
}
const WARNING = 'idempotency memory store is full: evicted the least recently used completed records'

let conformanceClock = Date.now()
runConformance(t, {
  name: 'memory',
  create: async () => new MemoryStore({ now: () => conformanceClock }),
  now: () => conformanceClock,
  advance: async (ms) => { conformanceClock += ms },
  pruneCount: 'exact'
})

/** A memory store on a clock the test moves, with a logger that keeps what it was told. */
function clockedStore (options: MemoryStoreOptions = {}) {
  const clock = { now: 1_700_000_000_000 }
  const warnings: Array<[object, string]> = []
  const logger: WarningLogger = { warn: (object, message) => { warnings.push([object, message]) } }
  const store = new MemoryStore({ maxBytes: 4096, now: () => clock.now, logger, ...options })
  return { store, clock, warnings, logger }
}

interface CompleteOptions {
  /** The body's kind: a Buffer (by default) or text. */
  body?: 'buffer' | 'text'
  headers?: Record<string, string>
  /** ms the record lives. Default an hour. */
  ttl?: number
}

/** Inserts a record under `key` and completes it with a body of `bodyBytes` bytes. */
async function complete (store: MemoryStore, clock: { now: number }, key: string, bodyBytes = 1000, { body = 'buffer', headers = {}, ttl = HOUR }: CompleteOptions = {}): Promise<void> {
  const owner = `owner-${key}`
  const inserted = await store.insert(key, { fingerprint: 'f', owner, expiresAt: clock.now + ttl, lease: HOUR, takeOverExpiredLease: false })
  const updated = await store.update(key, owner, {
    state: 'completed',
    response: { statusCode: 200, headers, body: body === 'text' ? 'x'.repeat(bodyBytes) : Buffer.alloc(bodyBytes, 1) },
    expiresAt: clock.now + ttl
  })
  if (!inserted.inserted || !updated) throw new Error(`could not complete ${key}`)
}

async function states (store: MemoryStore, keys: string[]): Promise<Record<string, string | undefined>> {
  const found: Record<string, string | undefined> = {}
  for (const key of keys) found[key] = (await store.lookup(key))?.state
  return found
}

t.test('evicts the least recently used completed record first when full', async (t) => {
  const { store, clock } = clockedStore()
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  const threeRecords = store.size
  t.ok(threeRecords <= store.maxBytes, 'three records fit')
  await complete(store, clock, 'd')
  t.strictSame(await states(store, ['a', 'b', 'c', 'd']), { a: undefined, b: 'completed', c: 'completed', d: 'completed' })
  t.equal(store.size, threeRecords, 'the evicted record gave back its bytes')
  t.ok(store.size <= store.maxBytes)
})

t.test('evicts as many of the least recently used completed records as it takes to fit', async (t) => {
  const { store, clock, warnings } = clockedStore()
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  await complete(store, clock, 'big', 3000)
  t.strictSame(await states(store, ['a', 'b', 'c', 'big']), { a: undefined, b: undefined, c: undefined, big: 'completed' })
  t.ok(store.size <= store.maxBytes, `size ${store.size} <= ${store.maxBytes}`)
  t.strictSame(warnings, [[{ evicted: 3, maxBytes: 4096 }, WARNING]])
})

t.test('never evicts a processing record, even the oldest', async (t) => {
  const { store, clock } = clockedStore()
  await store.insert('p', { fingerprint: 'f', owner: 'owner-p', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  await complete(store, clock, 'd')
  t.strictSame(await states(store, ['p', 'a', 'b', 'c', 'd']), { p: 'processing', a: undefined, b: 'completed', c: 'completed', d: 'completed' })
  t.ok(store.size <= store.maxBytes, `size ${store.size} <= ${store.maxBytes}`)
  t.equal(await store.update('p', 'owner-p', { state: 'processing', lease: HOUR }), true, 'its owner still holds it')
})

t.test('does not warn when only expired records made room', async (t) => {
  const { store, clock, warnings } = clockedStore()
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  clock.now += HOUR
  await complete(store, clock, 'd')
  t.strictSame(await states(store, ['a', 'b', 'c', 'd']), { a: undefined, b: undefined, c: undefined, d: 'completed' })
  t.strictSame(warnings, [])
})

t.test('completed records are evicted in the order they completed, whenever they started', async (t) => {
  const { store, clock } = clockedStore()
  await store.insert('a', { fingerprint: 'f', owner: 'owner-a', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  await complete(store, clock, 'b')
  await store.update('a', 'owner-a', {
    state: 'completed',
    response: { statusCode: 200, headers: {}, body: Buffer.alloc(1000, 1) },
    expiresAt: clock.now + HOUR
  })
  await complete(store, clock, 'c')
  await complete(store, clock, 'd')
  t.strictSame(await states(store, ['a', 'b', 'c', 'd']), { a: 'completed', b: undefined, c: 'completed', d: 'completed' },
    'b completed first, so it went first, though a started earlier')
  await complete(store, clock, 'e')
  t.strictSame(await states(store, ['a', 'c', 'd', 'e']), { a: undefined, c: 'completed', d: 'completed', e: 'completed' }, 'then a')
})

t.test('keeps nothing alive of the records it evicted and pruned', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 64 * 1024 })
  const bodies: Array<WeakRef<Buffer>> = []
  // In a function of its own, so that no variable of the test's refers to the last body.
  const completeWithBody = (key: string): void => {
    const body = Buffer.alloc(1000, 1)
    bodies.push(new WeakRef(body))
    store.insert(key, { fingerprint: 'f', owner: 'o', expiresAt: clock.now + 1000, lease: 1000, takeOverExpiredLease: false })
    store.update(key, 'o', { state: 'completed', response: { statusCode: 200, headers: {}, body }, expiresAt: clock.now + 1000 })
  }
  for (let index = 0; index < 200; index++) completeWithBody(`k${index}`)
  clock.now += 1000
  t.ok(await store.prune() > 0)
  t.equal(store.size, 0, 'every record is gone')
  await new Promise((resolve) => { setImmediate(resolve) })
  collectGarbage()
  t.equal(bodies.filter((body) => body.deref() !== undefined).length, 0, 'and so are their bodies')
})

t.test('a lease lapses exactly at its end by the store clock', async (t) => {
  const { store, clock } = clockedStore()
  const first = { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: 100, takeOverExpiredLease: false }
  const second = { ...first, owner: 'p', takeOverExpiredLease: true }
  await store.insert('k', first)
  clock.now += 99
  t.equal((await store.lookup('k'))?.leaseExpired, false, 'lookup 1 ms before')
  t.strictSame(await store.insert('k', second), {
    inserted: false,
    record: { state: 'processing', fingerprint: 'f', expiresAt: first.expiresAt, leaseExpired: false, response: undefined }
  }, 'insert 1 ms before')
  clock.now += 1
  t.equal((await store.lookup('k'))?.leaseExpired, true, 'lookup at the end')
  t.strictSame(await store.insert('k', first), {
    inserted: false,
    record: { state: 'processing', fingerprint: 'f', expiresAt: first.expiresAt, leaseExpired: true, response: undefined }
  }, 'insert at the end')
  t.strictSame(await store.insert('k', second), { inserted: true, tookOver: true }, 'a take-over at the end')
})

t.test('a record expires exactly at expiresAt by the store clock', async (t) => {
  const { store, clock } = clockedStore()
  await store.insert('k', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + 100, lease: HOUR, takeOverExpiredLease: false })
  clock.now += 99
  t.equal((await store.lookup('k'))?.state, 'processing', '1 ms before')
  t.equal(await store.prune(), 0, 'prune keeps it 1 ms before')
  clock.now += 1
  t.equal(await store.lookup('k'), undefined, 'at expiresAt')
  t.equal(await store.update('k', 'o', { state: 'halted', expiresAt: clock.now + HOUR }), false)
  t.equal(await store.prune(), 1)
  await store.insert('j', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + 100, lease: HOUR, takeOverExpiredLease: false })
  clock.now += 100
  t.strictSame(await store.insert('j', { fingerprint: 'g', owner: 'p', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false }),
    { inserted: true }, 'insert at expiresAt replaces it')
})

t.test('warns of evictions once, then at most once a minute with the count since', async (t) => {
  const { store, clock, warnings } = clockedStore()
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  await complete(store, clock, 'd')
  t.strictSame(warnings, [[{ evicted: 1, maxBytes: 4096 }, WARNING]], 'the first eviction warns')

  clock.now += 30_000
  await complete(store, clock, 'e')
  t.equal(warnings.length, 1, 'an eviction 30 s later does not')
  clock.now += 29_999
  await complete(store, clock, 'f')
  t.equal(warnings.length, 1, 'nor does one 59.999 s later')

  clock.now += 1
  await complete(store, clock, 'g')
  t.strictSame(warnings, [
    [{ evicted: 1, maxBytes: 4096 }, WARNING],
    [{ evicted: 3, maxBytes: 4096 }, WARNING]
  ], 'one 60 s later warns with the evictions since the last warning')
  t.strictSame(await states(store, ['d', 'e', 'f', 'g']), { d: undefined, e: 'completed', f: 'completed', g: 'completed' },
    'each of e, f and g evicted the oldest record')
})

t.test('evicts quietly without a logger', async (t) => {
  const clock = { now: 1_700_000_000_000 }
  const store = new MemoryStore({ maxBytes: 4096, now: () => clock.now })
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  await complete(store, clock, 'd')
  t.equal(await store.lookup('a'), undefined, 'evicted with no logger to tell')
})

t.test('never evicts a halted record: its outcome is unknown', async (t) => {
  const { store, clock, warnings } = clockedStore()
  await store.insert('halted', { fingerprint: 'f', owner: 'h', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  await store.update('halted', 'h', { state: 'halted', expiresAt: clock.now + HOUR })
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  await complete(store, clock, 'd')
  t.strictSame(await states(store, ['halted', 'a', 'b', 'c', 'd']), { halted: 'halted', a: undefined, b: 'completed', c: 'completed', d: 'completed' })
  t.equal(warnings.length, 1)
})

t.test('defaults to 64 MiB and the system clock', async (t) => {
  const store = new MemoryStore()
  t.equal(store.maxBytes, 64 * 1024 * 1024)
  t.equal(new MemoryStore({}).maxBytes, 64 * 1024 * 1024)
  t.equal(new MemoryStore({ maxBytes: undefined }).maxBytes, 64 * 1024 * 1024)
  t.equal(new MemoryStore({ maxBytes: 2048 }).maxBytes, 2048)
  await store.insert('live', { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + HOUR, lease: HOUR, takeOverExpiredLease: false })
  await store.insert('past', { fingerprint: 'f', owner: 'o', expiresAt: Date.now() - 1, lease: HOUR, takeOverExpiredLease: false })
  t.equal((await store.lookup('live'))?.leaseExpired, false)
  t.equal(await store.lookup('past'), undefined, 'a record that expired a millisecond ago by Date.now() is absent')
})

t.test('rejects invalid options with InvalidOptionError naming the option', async (t) => {
  const cases: Array<[string, unknown, string]> = [
    ['maxBytes below 1024', { maxBytes: 10 }, 'maxBytes must be >= 1024'],
    ['fractional maxBytes', { maxBytes: 2048.5 }, 'maxBytes must be integer'],
    ['maxBytes as a string', { maxBytes: '2048' }, 'maxBytes must be integer'],
    ['a clock that is not a function', { now: 5 }, 'now must be function'],
    ['a logger without warn', { logger: {} }, 'logger must have required properties warn'],
    ['a logger whose warn is not a function', { logger: { warn: 'loud' } }, 'logger.warn must be function'],
    ['an unknown option', { foo: 1 }, "MemoryStore has unknown option 'foo'"],
    ['unknown options', { foo: 1, bar: 2 }, "MemoryStore has unknown options 'foo', 'bar'"],
    ['null', null, 'MemoryStore options must be an object'],
    ['a string', 'big', 'MemoryStore options must be an object'],
    ['an array', [], 'MemoryStore options must be an object']
  ]
  for (const [name, options, detail] of cases) {
    let thrown: unknown
    try {
      t.notOk(new MemoryStore(options as MemoryStoreOptions), 'never built')
    } catch (error) {
      thrown = error
    }
    t.ok(thrown instanceof InvalidOptionError, `${name}: throws InvalidOptionError`)
    t.ok(thrown instanceof TypeError, `${name}: a TypeError`)
    t.equal((thrown as { code?: unknown }).code, 'FST_IDEMPOTENCY_INVALID_OPTION', `${name}: the code`)
    t.equal((thrown as Error).message, `Invalid fastify-idempotency option: ${detail}`, `${name}: the whole message`)
  }
})

t.test('accepts a logger whose warn is inherited, as a class instance has', async (t) => {
  const warnings: object[] = []
  class Logger {
    warn (object: object): void { warnings.push(object) }
  }
  const clock = { now: 1_700_000_000_000 }
  const store = new MemoryStore({ maxBytes: 4096, now: () => clock.now, logger: new Logger() })
  for (const key of ['a', 'b', 'c', 'd']) await complete(store, clock, key)
  t.strictSame(warnings, [{ evicted: 1, maxBytes: 4096 }])
})

t.test('keeps a response larger than maxBytes on its own rather than lose it, and evicts nothing for it', async (t) => {
  const { store, clock, warnings } = clockedStore()
  await complete(store, clock, 'a')
  await complete(store, clock, 'huge', 8000)
  t.strictSame(await states(store, ['a', 'huge']), { a: 'completed', huge: 'completed' })
  t.equal(((await store.lookup('huge'))?.response?.body as Buffer).length, 8000)
  t.strictSame(warnings, [])
  clock.now += HOUR
  t.equal(await store.prune(), 2, 'it expires like any record')
})

t.test('evicts completed text responses and gives back their bytes as it does Buffer ones', async (t) => {
  const { store, clock } = clockedStore()
  await complete(store, clock, 'a', 1000, { body: 'text' })
  await complete(store, clock, 'b', 1000, { body: 'text' })
  await complete(store, clock, 'c', 1000, { body: 'buffer' })
  const threeRecords = store.size
  await complete(store, clock, 'd', 1000, { body: 'text' })
  t.strictSame(await states(store, ['a', 'b', 'c', 'd']), { a: undefined, b: 'completed', c: 'completed', d: 'completed' })
  t.equal(store.size, threeRecords, 'the evicted text record gave back what it took')
  clock.now += HOUR
  t.equal(await store.prune(), 3)
  t.equal(store.size, 0, 'after pruning everything')
})

t.test('a replayed record counts as recently used: the least recently used goes first', async (t) => {
  const { store, clock } = clockedStore()
  await complete(store, clock, 'a')
  await complete(store, clock, 'b')
  await complete(store, clock, 'c')
  t.equal((await store.lookup('a'))?.state, 'completed', 'a is replayed')
  await complete(store, clock, 'd')
  t.strictSame(await states(store, ['a', 'b', 'c', 'd']), { a: 'completed', b: undefined, c: 'completed', d: 'completed' })
})

t.test('counts a completed record by its key, fingerprint, body, header names and header values, and running ones not at all', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 1024 * 1024 })
  await store.insert('k', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  t.equal(store.size, 0, 'a processing record is not counted')
  await store.update('k', 'o', {
    state: 'completed',
    response: { statusCode: 200, headers: { 'set-cookie': ['a=1', 'b=2'], 'content-length': 500 }, body: Buffer.alloc(500) },
    expiresAt: clock.now + HOUR
  })
  t.equal(store.size, 160 + 'k'.length + 'f'.length + 500 + 'set-cookie'.length + 'a=1,b=2'.length + 'content-length'.length + '500'.length)
  await store.insert('t', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  const before = store.size
  await store.update('t', 'o', { state: 'completed', response: { statusCode: 200, headers: {}, body: 'é€' }, expiresAt: clock.now + HOUR })
  t.equal(store.size - before, 160 + 2 + 5, 'a text body by its UTF-8 bytes')
})

t.test('goes over maxBytes rather than evict running or halted records, and warns of nothing', async (t) => {
  const { store, clock, warnings } = clockedStore({ maxBytes: 1024 })
  const keys = Array.from({ length: 20 }, (_, index) => `p${index}`)
  for (const key of keys) {
    t.strictSame(
      await store.insert(key, { fingerprint: 'f'.repeat(100), owner: `owner-${key}`, expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false }),
      { inserted: true }
    )
  }
  for (const key of keys.slice(10)) await store.update(key, `owner-${key}`, { state: 'halted', expiresAt: clock.now + HOUR })
  await complete(store, clock, 'done', 500)
  t.strictSame(Object.values(await states(store, keys)), keys.map((_, index) => index < 10 ? 'processing' : 'halted'))
  t.equal((await store.lookup('done'))?.state, 'completed')
  t.strictSame(warnings, [])
})

t.test('prunes expired records of every state and counts them', async (t) => {
  const { store, clock } = clockedStore()
  await store.insert('running', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + 100, lease: HOUR, takeOverExpiredLease: false })
  await store.insert('halted', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  await store.update('halted', 'o', { state: 'halted', expiresAt: clock.now + 100 })
  await complete(store, clock, 'completed', 100, { ttl: 100 })
  await complete(store, clock, 'live', 100)
  t.equal(await store.prune(), 0, 'nothing expired yet')
  clock.now += 100
  t.equal(await store.prune(), 3)
  t.strictSame(await states(store, ['running', 'halted', 'completed', 'live']), { running: undefined, halted: undefined, completed: undefined, live: 'completed' })
})

t.test('keeps a Buffer body that is a view into larger memory as a copy of its own, and a Buffer of its own as it is', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 4 * 1024 * 1024 })
  const large = Buffer.alloc(64 * 1024, 7)
  const bodies = { slice: large.subarray(100, 110), pooled: Buffer.from('{"id":1}'), whole: Buffer.allocUnsafeSlow(5).fill(1) }
  t.ok(bodies.pooled.buffer.byteLength > bodies.pooled.byteLength, 'a small Buffer.from is a view into the pool')
  for (const [key, body] of Object.entries(bodies)) {
    await store.insert(key, { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
    await store.update(key, 'o', { state: 'completed', response: { statusCode: 200, headers: {}, body }, expiresAt: clock.now + HOUR })
    const stored = (await store.lookup(key))?.response?.body as Buffer
    t.ok(stored.equals(body), `${key}: the same bytes`)
    t.equal(stored.buffer.byteLength, stored.byteLength, `${key}: in memory of its own size`)
  }
  large.fill(0)
  t.ok(((await store.lookup('slice'))?.response?.body as Buffer).equals(Buffer.alloc(10, 7)), 'the copy does not change with the memory it came from')
  t.equal((await store.lookup('whole'))?.response?.body, bodies.whole, 'a Buffer with memory of its own is kept as it is')
})

t.test('a completed record whose expiry has passed is not kept', async (t) => {
  const { store, clock } = clockedStore()
  await store.insert('k', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  t.equal(await store.update('k', 'o', { state: 'completed', response: { statusCode: 200, headers: {}, body: 'x' }, expiresAt: clock.now }), true)
  t.equal(await store.lookup('k'), undefined)
  t.equal(store.size, 0)
})

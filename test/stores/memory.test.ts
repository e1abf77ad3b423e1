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
const WARNING = 'idempotency memory store is full: evicted the oldest finished records'

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

t.test('evicts the oldest completed record first when full', async (t) => {
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

t.test('evicts as many of the oldest completed records as it takes to fit', async (t) => {
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

t.test('goes over maxBytes rather than evict processing records, and warns of nothing', async (t) => {
  const { store, clock, warnings } = clockedStore({ maxBytes: 1024 })
  const keys = Array.from({ length: 10 }, (_, index) => `p${index}`)
  for (const key of keys) {
    t.strictSame(
      await store.insert(key, { fingerprint: 'f', owner: `owner-${key}`, expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false }),
      { inserted: true }
    )
  }
  t.ok(store.size > store.maxBytes, `size ${store.size} > ${store.maxBytes}`)
  t.strictSame(Object.values(await states(store, keys)), keys.map(() => 'processing'))
  t.strictSame(warnings, [])
})

t.test('evicts an expired processing record, which counts as absent already', async (t) => {
  const { store, clock, warnings } = clockedStore()
  // Large headers count towards maxBytes without taking room in the ring: the store is full by
  // its count of bytes before the ring is.
  const headers = { 'x-pad': 'x'.repeat(400) }
  await store.insert('stale', { fingerprint: 'f', owner: 'owner-stale', expiresAt: clock.now + 100, lease: HOUR, takeOverExpiredLease: false })
  const staleSize = store.size
  clock.now += 100
  await complete(store, clock, 'a', 700, { headers })
  await complete(store, clock, 'b', 700, { headers })
  await complete(store, clock, 'c', 700, { headers })
  const withStale = store.size
  await complete(store, clock, 'd', 700, { headers })
  t.strictSame(await states(store, ['a', 'b', 'c', 'd']), { a: undefined, b: 'completed', c: 'completed', d: 'completed' })
  t.equal(store.size, withStale - staleSize, 'the stale record and a were evicted for d; only a counts as an eviction')
  t.strictSame(warnings, [[{ evicted: 1, maxBytes: 4096 }, WARNING]])
})

t.test('keeps a response larger than maxBytes on its own rather than lose it', async (t) => {
  const { store, clock, warnings } = clockedStore()
  await complete(store, clock, 'a')
  await complete(store, clock, 'huge', 8000)
  t.strictSame(await states(store, ['a', 'huge']), { a: undefined, huge: 'completed' })
  t.ok(store.size > store.maxBytes, 'over the bound by that one response only')
  t.strictSame(warnings, [[{ evicted: 1, maxBytes: 4096 }, WARNING]])
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

t.test('counts a response by its body, header names and header values', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 1024 * 1024 })
  await store.insert('k', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  const processing = store.size
  t.ok(processing > 0, 'a processing record has bookkeeping bytes')
  await store.update('k', 'o', {
    state: 'completed',
    response: { statusCode: 200, headers: { 'set-cookie': ['a=1', 'b=2'], 'content-length': 500 }, body: Buffer.alloc(500) },
    expiresAt: clock.now + HOUR
  })
  t.equal(store.size - processing, 500 + 'set-cookie'.length + 'a=1,b=2'.length + 'content-length'.length + '500'.length)
})

t.test('gives back the bytes of records deleted, pruned or replaced', async (t) => {
  const { store, clock } = clockedStore()
  t.equal(store.size, 0)
  await store.insert('k', { fingerprint: 'f', owner: 'first', expiresAt: clock.now + HOUR, lease: 100, takeOverExpiredLease: true })
  const one = store.size
  t.equal(await store.delete('k', 'first'), true)
  t.equal(store.size, 0, 'after delete')

  await store.insert('k', { fingerprint: 'f', owner: 'first', expiresAt: clock.now + HOUR, lease: 100, takeOverExpiredLease: true })
  clock.now += 100
  await store.insert('k', { fingerprint: 'f', owner: 'other', expiresAt: clock.now + HOUR, lease: 100, takeOverExpiredLease: true })
  t.equal(store.size, one, 'after a take-over by an owner of the same length')

  await complete(store, clock, 'done', 700)
  clock.now += HOUR
  await store.insert('k', { fingerprint: 'f', owner: 'third', expiresAt: clock.now + 100, lease: 100, takeOverExpiredLease: false })
  t.equal(await store.prune(), 1, 'the expired done is pruned')
  t.equal(store.size, one, 'after replacing the expired k and pruning the expired done')
  clock.now += 100
  t.equal(await store.prune(), 1)
  t.equal(store.size, 0, 'after pruning everything')
})

t.test('a completed text response comes back exactly as it was stored, whatever its characters', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 1024 * 1024 })
  const headers = Object.freeze({ 'content-type': 'text/plain; charset=utf-8', 'x-count': 3 })
  // Expiries: a whole number of ms, as the plugin writes them, and others a direct caller may give.
  const cases = [
    { fingerprint: '{"a":"1 2 3"}', body: '12 34 ', expiresAt: clock.now + HOUR },
    { fingerprint: '7 7', body: '', expiresAt: clock.now + HOUR + 0.5 },
    { fingerprint: '', body: 'é 😀 \u0000 end', expiresAt: 1e20 },
    { fingerprint: '{"a":"é 😀"}', body: ' ', expiresAt: Infinity }
  ]
  for (const [index, { fingerprint, body, expiresAt }] of cases.entries()) {
    const key = `k${index}`
    await store.insert(key, { fingerprint, owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
    t.equal(await store.update(key, 'o', { state: 'completed', response: { statusCode: 201 + index, headers, body }, expiresAt }), true)
    const expected = { state: 'completed', fingerprint, expiresAt, leaseExpired: false, response: { statusCode: 201 + index, headers, body } }
    const found = await store.lookup(key)
    t.strictSame(found, expected, `lookup of ${JSON.stringify(body)}`)
    t.equal(found?.response?.headers, headers, 'the very header object it was given')
    t.strictSame(await store.insert(key, { fingerprint, owner: 'p', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: true }),
      { inserted: false, record: expected }, `insert over ${JSON.stringify(body)}`)
    t.equal(await store.update(key, 'o', { state: 'halted', expiresAt }), false, 'a completed record takes no more updates')
    t.equal(await store.delete(key, 'o'), false, 'nor a delete')
  }
  await store.insert('past', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  await store.update('past', 'o', { state: 'completed', response: { statusCode: 200, headers, body: 'x' }, expiresAt: -1 })
  t.equal(await store.lookup('past'), undefined, 'a record completed with an expiry in the past is gone')
  clock.now += HOUR + 1
  t.equal(await store.lookup('k0'), undefined, 'a completed record expires')
  t.equal(await store.lookup('k1'), undefined, 'at its fraction of a ms too')
  t.equal((await store.lookup('k2'))?.expiresAt, 1e20, 'one far away stays')
  t.equal(await store.prune(), 3, 'prune removes the expired three and no other')
  t.equal((await store.insert('k0', { fingerprint: 'new', owner: 'q', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })).inserted, true,
    'and its key takes a new one')
})

t.test('completed records keep their own header set while other sets come and go', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 1024 * 1024 })
  const sets = [0, 1, 2, 3].map((index) => Object.freeze({ 'x-set': String(index) }))
  const completeWith = async (key: string, headers: Record<string, string>, ttl: number): Promise<void> => {
    await complete(store, clock, key, 10, { body: 'text', headers, ttl })
  }
  await completeWith('short-a', sets[0]!, 100)
  await completeWith('long', sets[1]!, HOUR)
  await completeWith('short-b', sets[0]!, 100)
  clock.now += 100
  t.equal(await store.prune(), 2, 'the only records with set 0 went')
  await completeWith('new', sets[2]!, HOUR)
  await completeWith('again', sets[0]!, HOUR)
  await completeWith('shared', sets[2]!, HOUR)
  for (const [key, headers] of [['long', sets[1]], ['new', sets[2]], ['again', sets[0]], ['shared', sets[2]]] as const) {
    t.equal((await store.lookup(key))?.response?.headers, headers, `${key} has its own set`)
  }
  clock.now += HOUR
  t.equal(await store.prune(), 4)
  t.equal(store.size, 0)
  await completeWith('after', sets[3]!, HOUR)
  t.equal((await store.lookup('after'))?.response?.headers, sets[3], 'a set whose records all went is taken afresh')
})

t.test('keeps a Buffer body as a copy of its bytes, whatever memory it shares, and hands out copies', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 4 * 1024 * 1024 })
  const large = Buffer.alloc(64 * 1024, 7)
  const bodies = {
    slice: large.subarray(100, 110),
    pooled: Buffer.from('{"id":1}'),
    whole: Buffer.allocUnsafeSlow(5).fill(1),
    // Too large for the ring: kept as an object, and a view into larger memory copied.
    largeSlice: Buffer.alloc(64 * 1024, 3).subarray(10, 20 * 1024),
    largeWhole: Buffer.alloc(20 * 1024, 4)
  }
  t.ok(bodies.pooled.buffer.byteLength > bodies.pooled.byteLength, 'a small Buffer.from is a view into the pool')
  for (const [key, body] of Object.entries(bodies)) {
    await store.insert(key, { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
    await store.update(key, 'o', { state: 'completed', response: { statusCode: 200, headers: {}, body }, expiresAt: clock.now + HOUR })
    const stored = (await store.lookup(key))?.response?.body as Buffer
    t.ok(Buffer.isBuffer(stored), `${key}: a Buffer`)
    t.ok(stored.equals(body), `${key}: the same bytes`)
  }
  large.fill(0)
  bodies.whole.fill(9)
  t.ok(((await store.lookup('slice'))?.response?.body as Buffer).equals(Buffer.alloc(10, 7)), 'the copy does not change with the memory it came from')
  t.ok(((await store.lookup('whole'))?.response?.body as Buffer).equals(Buffer.alloc(5, 1)), 'nor with the Buffer it was given')
  const handedOut = (await store.lookup('pooled'))?.response?.body as Buffer
  handedOut.fill(0)
  t.ok(((await store.lookup('pooled'))?.response?.body as Buffer).equals(Buffer.from('{"id":1}')), 'nor with a copy it handed out')
  const largeSlice = (await store.lookup('largeSlice'))?.response?.body as Buffer
  t.equal(largeSlice.buffer.byteLength, largeSlice.byteLength, 'a large view is kept in memory of its own size')
  t.equal((await store.lookup('largeWhole'))?.response?.body, bodies.largeWhole, 'a large Buffer with memory of its own is kept as it is')
})

t.test('a fingerprint of two-byte text does not double the memory of the text body stored with it', async (t) => {
  const records = 100
  const bodyLength = 100_000
  async function heapGrowth (fingerprint: string): Promise<number> {
    const store = new MemoryStore({ maxBytes: 1024 * 1024 * 1024 })
    collectGarbage()
    const before = process.memoryUsage().heapUsed
    for (let index = 0; index < records; index++) {
      const key = `k${index}`
      await store.insert(key, { fingerprint, owner: 'o', expiresAt: Date.now() + HOUR, lease: HOUR, takeOverExpiredLease: false })
      const body = Buffer.alloc(bodyLength, 'x').toString('latin1')
      await store.update(key, 'o', { state: 'completed', response: { statusCode: 200, headers: {}, body }, expiresAt: Date.now() + HOUR })
    }
    collectGarbage()
    const grown = process.memoryUsage().heapUsed - before
    t.equal((await store.lookup('k0'))?.response?.body.length, bodyLength, `the store with fingerprint ${fingerprint} still holds its records`)
    return grown
  }
  const oneByte = await heapGrowth('{"name":"e"}')
  const twoByte = await heapGrowth('{"name":"€"}')
  t.ok(oneByte < records * bodyLength * 1.5, `bodies of one-byte text take about their length: ${oneByte} bytes`)
  t.ok(twoByte < oneByte * 1.5, `with a two-byte fingerprint too: ${twoByte} bytes against ${oneByte}`)
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

t.test('evicts completed text responses and gives back their bytes as it does Buffer ones', async (t) => {
  const { store, clock } = clockedStore()
  await complete(store, clock, 'a', 1000, { body: 'text' })
  await complete(store, clock, 'b', 1000, { body: 'text' })
  await complete(store, clock, 'c', 1000, { body: 'buffer' })
  const threeRecords = store.size
  await complete(store, clock, 'd', 1000, { body: 'text' })
  t.strictSame(await states(store, ['a', 'b', 'c', 'd']), { a: undefined, b: 'completed', c: 'completed', d: 'completed' })
  t.equal(store.size, threeRecords, 'the evicted text record gave back what it took')
  await complete(store, clock, 'e', 5000, { body: 'text' })
  t.strictSame(await states(store, ['b', 'c', 'd', 'e']), { b: undefined, c: undefined, d: undefined, e: 'completed' },
    'a text response larger than maxBytes is kept, all others go')
  clock.now += HOUR
  t.equal(await store.prune(), 1)
  t.equal(store.size, 0, 'after pruning everything')
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
  t.strictSame(await store.insert('k', second), { inserted: true }, 'a take-over at the end')
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

t.test('a held running record keeps its lease and stays while its tracker is open, and lapses one lease after it closed, by the store clock', async (t) => {
  const { store, clock } = clockedStore()
  const holder = store.leaseHolder()
  const record = { fingerprint: 'f', owner: 'o', expiresAt: clock.now + 1000, lease: 100, takeOverExpiredLease: false, holder }
  const takeOver = { ...record, owner: 'p', takeOverExpiredLease: true, holder: store.leaseHolder() }
  t.strictSame(await store.insert('k', record), { inserted: true })
  clock.now += 5000
  t.strictSame(await store.lookup('k'), { state: 'processing', fingerprint: 'f', expiresAt: clock.now + 100, leaseExpired: false, response: undefined },
    'long past its lease and expiresAt, it runs on, as if renewed at every look')
  t.equal((await store.insert('k', takeOver)).inserted, false, 'it is not taken over')
  t.equal(await store.prune(), 0, 'prune keeps it')
  const closedAt = clock.now
  holder.close()
  clock.now += 50
  holder.close()
  clock.now += 49
  t.match(await store.lookup('k'), { state: 'processing', expiresAt: closedAt + 100, leaseExpired: false }, 'the lease runs on for 99 ms after the close (a second close changes nothing)')
  clock.now += 1
  t.equal(await store.lookup('k'), undefined, 'the record itself expires with the lease when its expiresAt has passed')
  t.strictSame(await store.insert('k', takeOver), { inserted: true }, 'and the key is free')

  await store.insert('j', { ...record, expiresAt: clock.now + HOUR })
  clock.now += 100
  t.match(await store.lookup('j'), { state: 'processing', leaseExpired: true }, 'a record inserted after its tracker closed has the plain lease')
  t.strictSame(await store.insert('j', { ...takeOver, expiresAt: clock.now + HOUR }), { inserted: true }, 'and it is taken over at its end')
})

t.test('a released hold lets the lease run out one lease later; a renewal ends the hold too; a hold from elsewhere is not one', async (t) => {
  const { store, clock } = clockedStore()
  const holder = store.leaseHolder()
  const record = (owner: string, lease = 100) => ({ fingerprint: 'f', owner, expiresAt: clock.now + 10, lease, takeOverExpiredLease: false, holder })
  await store.insert('released', record('a'))
  await store.insert('renewed', record('b'))
  await store.insert('stranger', record('c'))
  await store.insert('foreign', { ...record('d'), holder: new MemoryStore().leaseHolder() })
  await store.insert('fake', { ...record('e'), holder: { close () {}, release () {} } })
  clock.now += 1000
  const releasedAt = clock.now
  holder.release('released', 'a')
  holder.release('stranger', 'someone else')
  holder.release('nothing here', 'a')
  t.equal(await store.update('renewed', 'b', { state: 'processing', lease: 300 }), true)
  clock.now += 99
  t.same(await states(store, ['released', 'renewed', 'stranger', 'foreign', 'fake']),
    { released: 'processing', renewed: 'processing', stranger: 'processing', foreign: undefined, fake: undefined },
    'a hold from another store, or none of a store\'s, holds nothing: those records expired on time')
  t.match(await store.lookup('released'), { expiresAt: releasedAt + 100, leaseExpired: false })
  clock.now += 1
  t.same(await states(store, ['released', 'renewed', 'stranger']), { released: undefined, renewed: 'processing', stranger: 'processing' },
    'released: gone one lease after the release; renewed: on a lease of its own; released by a stranger: held still')
  clock.now += 200
  t.same(await states(store, ['renewed', 'stranger']), { renewed: undefined, stranger: 'processing' })

  await store.insert('halted', record('f'))
  await store.update('halted', 'f', { state: 'halted', expiresAt: clock.now + 50 })
  holder.release('halted', 'f')
  holder.close()
  clock.now += 60
  t.equal(await store.lookup('halted'), undefined, 'a release does not keep a halted record past its expiry')
  clock.now += 40
  holder.release('stranger', 'c')
  t.equal(await store.lookup('stranger'), undefined, 'nor revive a lease that lapsed once the tracker closed')
})

t.test('the owner of a held record completes it long after its nominal expiry, and halts or releases it likewise', async (t) => {
  const { store, clock } = clockedStore()
  const holder = store.leaseHolder()
  for (const key of ['done', 'halted', 'released']) {
    await store.insert(key, { fingerprint: 'f', owner: key, expiresAt: clock.now + 1000, lease: 100, takeOverExpiredLease: false, holder })
  }
  clock.now += 10_000
  const response = { statusCode: 201, headers: {}, body: 'ok' }
  t.equal(await store.update('done', 'done', { state: 'completed', response, expiresAt: clock.now + HOUR }), true)
  t.equal(await store.update('halted', 'halted', { state: 'halted', expiresAt: clock.now + HOUR }), true)
  t.equal(await store.delete('released', 'released'), true)
  t.same(await states(store, ['done', 'halted', 'released']), { done: 'completed', halted: 'halted', released: undefined })
  t.equal(await store.update('halted', 'halted', { state: 'halted', expiresAt: clock.now + HOUR }), false, 'a halted record is no longer held')
})

t.test('prune and a sweep keep held running records, and remove them and give back their bytes once the hold ended and their lease and expiry passed', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 2048 })
  const holder = store.leaseHolder()
  await store.insert('held', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + 10, lease: 10, takeOverExpiredLease: false, holder })
  const heldBytes = store.size
  clock.now += 2000
  t.equal(await store.prune(), 0, 'prune keeps it while its tracker is open')
  // a completed record over maxBytes makes the store sweep its running records
  await complete(store, clock, 'big1', 3000)
  t.equal((await store.lookup('held'))?.state, 'processing', 'so does a sweep')
  const withHeld = store.size
  holder.close()
  clock.now += 2000
  await complete(store, clock, 'big2', 3000)
  t.equal(store.size, withHeld - heldBytes, 'a sweep removed it once the hold ended: its bytes are given back')
  t.equal(await store.lookup('held'), undefined)

  const other = clockedStore()
  const otherHolder = other.store.leaseHolder()
  await other.store.insert('held', { fingerprint: 'f', owner: 'o', expiresAt: other.clock.now + 10, lease: 10, takeOverExpiredLease: false, holder: otherHolder })
  otherHolder.close()
  other.clock.now += 10
  t.equal(await other.store.prune(), 1, 'prune removes it once the hold ended')
  t.equal(other.store.size, 0)
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
      new MemoryStore(options as MemoryStoreOptions)
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

t.test('a record set aside while running goes to the back of the eviction order once it completes', async (t) => {
  const { store, clock } = clockedStore()
  await store.insert('p', { fingerprint: 'f', owner: 'owner-p', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  for (const key of ['a', 'b', 'c', 'd']) await complete(store, clock, key)
  t.strictSame(await states(store, ['p', 'a', 'b', 'c', 'd']), { p: 'processing', a: undefined, b: 'completed', c: 'completed', d: 'completed' },
    'd made room by evicting a, setting aside the running p')
  await store.update('p', 'owner-p', { state: 'completed', response: { statusCode: 200, headers: {}, body: Buffer.alloc(1000, 1) }, expiresAt: clock.now + HOUR })
  t.strictSame(await states(store, ['p', 'b', 'c', 'd']), { p: 'completed', b: undefined, c: 'completed', d: 'completed' },
    'p, the record just stored, made room by evicting b')
  await complete(store, clock, 'e')
  t.strictSame(await states(store, ['p', 'c', 'd', 'e']), { p: 'completed', c: undefined, d: 'completed', e: 'completed' },
    'e made room by evicting c: p took its place when it completed, after d')
  t.ok(store.size <= store.maxBytes)
})

t.test('a record kept while it made room for itself is the first to go after', async (t) => {
  const { store, clock } = clockedStore()
  await complete(store, clock, 'a', 900)
  await complete(store, clock, 'b', 900)
  await complete(store, clock, 'c', 900)
  // Larger than maxBytes alone: everything else goes.
  await complete(store, clock, 'k', 5000)
  t.strictSame(await states(store, ['a', 'b', 'c', 'k']), { a: undefined, b: undefined, c: undefined, k: 'completed' },
    'k made room by evicting a, b and c, and was kept')
  await complete(store, clock, 'd', 900)
  t.strictSame(await states(store, ['k', 'd']), { k: undefined, d: 'completed' }, 'd made room by evicting k')
  await complete(store, clock, 'e', 900)
  t.strictSame(await states(store, ['d', 'e']), { d: 'completed', e: 'completed' })
})

t.test('a record set aside while running, then halted, is removed once expired before any live one is evicted', async (t) => {
  const { store, clock } = clockedStore()
  await store.insert('p', { fingerprint: 'f', owner: 'owner-p', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  await store.insert('q', { fingerprint: 'f', owner: 'owner-q', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  for (const key of ['a', 'b', 'c', 'd']) await complete(store, clock, key, 850)
  t.equal((await store.lookup('a')), undefined, 'd evicted a, setting aside the running p and q')
  t.equal(await store.update('p', 'owner-p', { state: 'halted', expiresAt: clock.now + 1000 }), true, 'the record set aside is found and halted')
  t.equal((await store.lookup('p'))?.state, 'halted')
  clock.now += 5000
  // e does not fit: room is made.
  await complete(store, clock, 'e', 600)
  t.strictSame(await states(store, ['p', 'q', 'b', 'c', 'd', 'e']), { p: undefined, q: 'processing', b: 'completed', c: 'completed', d: 'completed', e: 'completed' },
    'e made room by removing the expired p, not by evicting b; the running q stays')
  t.equal(await store.prune(), 0, 'p was removed then, not left for prune')
  clock.now += HOUR
  t.equal(await store.prune(), 5, 'prune removes the record set aside too, with the rest')
  t.equal(store.size, 0)
})

t.test('a running record set aside that expires without an update goes before any live one', async (t) => {
  const { store, clock } = clockedStore()
  // A large fingerprint makes the running record large enough that removing it alone makes room.
  await store.insert('stale', { fingerprint: 'f'.repeat(1000), owner: 'owner-stale', expiresAt: clock.now + 1000, lease: HOUR, takeOverExpiredLease: false })
  for (const key of ['a', 'b', 'c', 'd']) await complete(store, clock, key, 900)
  t.strictSame(await states(store, ['stale', 'a', 'b', 'c', 'd']), { stale: 'processing', a: undefined, b: undefined, c: 'completed', d: 'completed' },
    'c and d evicted a and b, setting aside the running stale record')
  clock.now += 5000
  await complete(store, clock, 'e', 900)
  t.strictSame(await states(store, ['c', 'd', 'e']), { c: 'completed', d: 'completed', e: 'completed' },
    'e made room by removing the expired stale record, not by evicting c')
  t.ok(store.size <= store.maxBytes)
})

t.test('inserts into a full store as fast as into one with room: eviction never steps over what it evicted', async (t) => {
  const response = { statusCode: 201, headers: { 'content-type': 'application/json' }, body: '{"id":"ord_1","status":"created"}' }
  let next = 0
  const insert = (store: MemoryStore): void => {
    const key = `key-${next++}`
    store.insert(key, { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + HOUR, lease: HOUR, takeOverExpiredLease: false })
    store.update(key, 'o', { state: 'completed', response, expiresAt: Date.now() + HOUR })
  }
  // The fastest of several batches: a pause of the machine or the collector slows one batch, not all.
  const fastest = (store: MemoryStore): number => {
    let best = Infinity
    for (let batch = 0; batch < 8; batch++) {
      const started = process.hrtime.bigint()
      for (let index = 0; index < 10_000; index++) insert(store)
      best = Math.min(best, Number(process.hrtime.bigint() - started) / 10_000)
    }
    return best
  }
  // 8 MiB hold about 35 000 of these records. Stepping over the entries evicted since the Map
  // last compacted (up to about 30 000 of them) made each insert into the full store cost
  // several µs, about ten times one into a store with room.
  const full = new MemoryStore({ maxBytes: 8 * 1024 * 1024 })
  for (let index = 0; index < 40_000; index++) insert(full)
  const roomy = new MemoryStore({ maxBytes: 1024 * 1024 * 1024 })
  const withRoom = fastest(roomy)
  const whenFull = fastest(full)
  t.ok(full.size <= full.maxBytes, 'the full store stayed within maxBytes')
  t.ok(whenFull < withRoom * 3, `an insert that evicts takes ${whenFull.toFixed(0)} ns, one with room ${withRoom.toFixed(0)} ns`)
})

t.test('inserts into a store full of halted records as fast as into one with room: each is set aside once, not stepped over by every insert', async (t) => {
  const response = { statusCode: 201, headers: { 'content-type': 'application/json' }, body: '{"id":"ord_1","status":"created"}' }
  let next = 0
  const add = (store: MemoryStore, state: 'halted' | 'completed'): string => {
    const key = `key-${next++}`
    store.insert(key, { fingerprint: 'f', owner: 'o', expiresAt: Date.now() + HOUR, lease: HOUR, takeOverExpiredLease: false })
    if (state === 'halted') store.update(key, 'o', { state: 'halted', expiresAt: Date.now() + HOUR })
    else store.update(key, 'o', { state: 'completed', response, expiresAt: Date.now() + HOUR })
    return key
  }
  const fastest = (store: MemoryStore): number => {
    let best = Infinity
    for (let batch = 0; batch < 6; batch++) {
      const started = process.hrtime.bigint()
      for (let index = 0; index < 2_000; index++) add(store, 'completed')
      best = Math.min(best, Number(process.hrtime.bigint() - started) / 2_000)
    }
    return best
  }
  // 1 MiB holds about 5 000 such records. Once a sweep had stepped over them all and found
  // nothing to evict, every later insert swept them all again: about 100 µs per insert here.
  const full = new MemoryStore({ maxBytes: 1024 * 1024 })
  const halted: string[] = []
  for (let index = 0; index < 8_000; index++) halted.push(add(full, 'halted'))
  const haltedBytes = full.size
  t.ok(haltedBytes > full.maxBytes, 'halted records are kept past maxBytes rather than forgotten')
  const roomy = new MemoryStore({ maxBytes: 1024 * 1024 * 1024 })
  const withRoom = fastest(roomy)
  const whenHeld = fastest(full)
  t.ok(whenHeld < withRoom * 3, `an insert into the store full of halted records takes ${whenHeld.toFixed(0)} ns, one with room ${withRoom.toFixed(0)} ns`)
  t.equal((await full.lookup(halted[0] as string))?.state, 'halted', 'a record set aside is still found')
  const again = await full.insert(halted[0] as string, { fingerprint: 'f', owner: 'other', expiresAt: Date.now() + HOUR, lease: HOUR, takeOverExpiredLease: false })
  t.equal(again.inserted, false, 'and still holds its key')
  t.ok(full.size <= haltedBytes + 1024, `completed records were evicted meanwhile: ${full.size - haltedBytes} bytes besides the halted ones`)
  t.equal((await full.lookup(`key-${next - 1}`))?.state, 'completed', 'the newest completed record is kept')
})

t.test('prunes a store larger than one chunk a chunk per turn of the event loop, and removes every expired record', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 1024 * 1024 * 1024 })
  const response = { statusCode: 201, headers: {}, body: 'ok' }
  for (let index = 0; index < 12_000; index++) {
    const key = `key-${index}`
    store.insert(key, { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
    store.update(key, 'o', { state: 'completed', response, expiresAt: clock.now + (index % 2 === 0 ? 1000 : HOUR) })
  }
  // The bytes of the records that will expire, and of the record inserted during the prune.
  const expiring = clockedStore({ maxBytes: 1024 * 1024 * 1024 })
  for (let index = 0; index < 12_000; index += 2) {
    expiring.store.insert(`key-${index}`, { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
    expiring.store.update(`key-${index}`, 'o', { state: 'completed', response, expiresAt: clock.now + HOUR })
  }
  const inserted = clockedStore()
  inserted.store.insert('during', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  const before = store.size
  clock.now += 5000
  const pruning = store.prune()
  t.ok(pruning instanceof Promise, 'a store larger than one chunk answers through a promise')
  let turned = false
  setImmediate(() => {
    turned = true
    store.insert('during', { fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  })
  const removed = await Promise.resolve(pruning).then((count) => {
    t.ok(turned, 'the event loop turned before the prune was done')
    return count
  })
  t.equal(removed, 6000, 'every expired record, and no other')
  t.equal((await store.lookup('key-0')), undefined)
  t.equal((await store.lookup('key-1'))?.state, 'completed')
  t.equal((await store.lookup('during'))?.state, 'processing', 'a record inserted meanwhile is kept')
  t.equal(store.size, before - expiring.store.size + inserted.store.size, 'the removed records gave back their bytes')
  t.equal(typeof clockedStore().store.prune(), 'number', 'a small store is pruned at once')
})

t.test('a chunked prune walks the records set aside too, and leaves a halt made meanwhile to be removed on time', async (t) => {
  const { store, clock } = clockedStore({ maxBytes: 1024 })
  const running = () => ({ fingerprint: 'f', owner: 'o', expiresAt: clock.now + HOUR, lease: HOUR, takeOverExpiredLease: false })
  store.insert('p', running())
  // Over maxBytes with nothing to evict: eviction sets them all aside.
  for (let index = 0; index < 6000; index++) store.insert(`k${index}`, running())
  const pruning = store.prune()
  t.ok(pruning instanceof Promise, 'more than one chunk')
  t.equal(store.update('p', 'o', { state: 'halted', expiresAt: clock.now + 2000 }), true, 'p, which the first chunk passed, halts with a short expiry')
  t.equal(await pruning, 0)
  const before = store.size
  clock.now += 3000
  store.insert('x', running())
  t.equal(store.size, before, 'x made room by removing the expired p (both are 163 bytes)')
  clock.now += 2 * HOUR
  const last = store.prune()
  t.ok(last instanceof Promise)
  t.equal(await last, 6001, 'every record set aside and x, over two chunks')
  t.equal(store.size, 0)
})

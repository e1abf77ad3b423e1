import t from 'tap'
import { MemoryStore, RequestTracker } from '../lib/index.js'
import { FaultyStore } from './helpers/stores.js'
import { sleep } from './helpers/timing.js'

interface Warning { object: object, message: string }

function recordingLogger () {
  const warnings: Warning[] = []
  return { warnings, warn: (object: object, message: string) => { warnings.push({ object, message }) } }
}

const options = { cacheTtl: 60_000, processingTtl: 30, releaseOnError: false }

t.test('track creates a record owned by the caller, then reports what later callers should get', async (t) => {
  const tracker = new RequestTracker(new MemoryStore(), { logger: recordingLogger(), ...options })
  const created = await tracker.track('k', 'fp', options)
  t.equal(created.status, 'created')
  t.match(created, { owner: /^[0-9a-f-]{36}\.[0-9a-z]+$/ })
  t.same(await tracker.track('k', 'fp', options), { status: 'processing', expiresAt: created.expiresAt })
  t.same(await tracker.track('k', 'other', options), { status: 'mismatch', expiresAt: created.expiresAt })
  const response = { statusCode: 201, headers: { 'content-type': 'text/plain' }, body: Buffer.from('done') }
  t.equal(await tracker.putResponse('k', (created as { owner: string }).owner, response, created.expiresAt + 1), true)
  t.same(await tracker.track('k', 'fp', options), { status: 'completed', response, expiresAt: created.expiresAt + 1 })
  tracker.close()
})

t.test('only the owner can complete, halt or release a record', async (t) => {
  const tracker = new RequestTracker(new MemoryStore(), { logger: recordingLogger(), ...options })
  const created = await tracker.track('k', 'fp', options) as { owner: string, expiresAt: number }
  const response = { statusCode: 200, headers: {}, body: Buffer.alloc(0) }
  t.equal(await tracker.putResponse('k', 'stranger', response, created.expiresAt), false)
  t.equal(await tracker.halt('k', 'stranger', created.expiresAt), false)
  t.equal(await tracker.release('k', 'stranger'), false)
  t.equal(await tracker.halt('k', created.owner, created.expiresAt), true)
  t.same(await tracker.track('k', 'fp', options), { status: 'halted', expiresAt: created.expiresAt })
  tracker.close()
})

t.test('renews the lease of a running request and stops when it ends', async (t) => {
  const store = new FaultyStore()
  const tracker = new RequestTracker(store, { logger: recordingLogger(), ...options })
  const created = await tracker.track('k', 'fp', options) as { owner: string, expiresAt: number }
  await sleep(80)
  const renewals = store.calls.filter((call) => call.operation === 'update' && call.state === 'processing').length
  t.ok(renewals >= 2, `renewed ${renewals} times in 80 ms with a 30 ms lease`)
  t.equal((await tracker.track('k', 'fp', options)).status, 'processing', 'the lease is live')
  await tracker.halt('k', created.owner, created.expiresAt)
  const after = store.calls.length
  await sleep(40)
  t.equal(store.calls.filter((call, index) => index >= after && call.operation === 'update').length, 0, 'no renewal once settled')
  tracker.close()
})

t.test('lets a lease run out when its request is abandoned, or settling it fails, whether the store throws or rejects', async (t) => {
  for (const throws of [true, false]) {
    const store = new FaultyStore(new MemoryStore(), { throws })
    const tracker = new RequestTracker(store, { logger: recordingLogger(), ...options })
    const owners: Record<string, string> = {}
    for (const key of ['forgotten', 'completed', 'halted', 'released', 'running']) {
      owners[key] = ((await tracker.track(key, 'fp', options)) as { owner: string }).owner
    }
    tracker.abandon('forgotten', owners.forgotten as string)
    store.failing = new Set(['update', 'delete'])
    const response = { statusCode: 200, headers: {}, body: 'x' }
    await t.rejects(async () => await tracker.putResponse('completed', owners.completed as string, response), /store update failed/)
    await t.rejects(async () => await tracker.halt('halted', owners.halted as string), /store update failed/)
    await t.rejects(async () => await tracker.release('released', owners.released as string), /store delete failed/)
    store.failing.clear()
    await sleep(80)
    const statuses: Record<string, string> = {}
    for (const key of Object.keys(owners)) statuses[key] = (await tracker.track(key, 'fp', options)).status
    t.same(statuses, { forgotten: 'halted', completed: 'halted', halted: 'halted', released: 'halted', running: 'processing' },
      `${throws ? 'throws' : 'rejects'}: each lapsed with its lease; the request still running is renewed`)
    tracker.close()
  }
})

t.test('retries a failed renewal and warns', async (t) => {
  const store = new FaultyStore()
  const logger = recordingLogger()
  const tracker = new RequestTracker(store, { logger, ...options })
  await tracker.track('k', 'fp', options)
  store.failing.add('update')
  await sleep(50)
  const failures = logger.warnings.filter((warning) => warning.message.includes('renewal failed'))
  t.ok(failures.length >= 2, `warned ${failures.length} times`)
  tracker.close()
})

t.test('stops renewing and warns when the lease was lost to another owner', async (t) => {
  const store = new FaultyStore()
  const logger = recordingLogger()
  const tracker = new RequestTracker(store, { logger, ...options })
  const first = await tracker.track('k', 'fp', options) as { owner: string }
  // another instance took the key over: the record now belongs to someone else
  await store.inner.delete('k', first.owner)
  await store.inner.insert('k', { fingerprint: 'fp', owner: 'other', expiresAt: Date.now() + 60_000, lease: 60_000, takeOverExpiredLease: false })
  await sleep(60)
  const lost = logger.warnings.filter((warning) => warning.message.includes('lease lost'))
  t.equal(lost.length, 1, 'warned once')
  const renewals = store.calls.filter((call) => call.operation === 'update').length
  await sleep(40)
  t.equal(store.calls.filter((call) => call.operation === 'update').length, renewals, 'and stopped renewing')
  tracker.close()
})

t.test('keeps renewing the lease of a request that took a key over, whatever the request it took it from does', async (t) => {
  const store = new FaultyStore()
  const tracker = new RequestTracker(store, { logger: recordingLogger(), ...options })
  const takeOver = { ...options, releaseOnError: true }
  const first = await tracker.track('k', 'fp', takeOver) as { owner: string, expiresAt: number }
  // the first request's renewals fail until its lease has expired: a second request takes the key over
  store.failing.add('update')
  await sleep(50)
  store.failing.clear()
  const second = await tracker.track('k', 'fp', takeOver)
  t.equal(second.status, 'created', 'the second request took the key over')
  const response = { statusCode: 200, headers: {}, body: Buffer.from('late') }
  t.equal(await tracker.putResponse('k', first.owner, response, first.expiresAt), false, 'the first request can no longer save')
  await sleep(80)
  t.equal((await tracker.track('k', 'fp', options)).status, 'processing', "the second request's lease is still renewed")
  tracker.close()
})

t.test('uses its default options when track, putResponse and halt are given none', async (t) => {
  const tracker = new RequestTracker(new MemoryStore(), { logger: recordingLogger(), cacheTtl: 5_000, processingTtl: 1_000, releaseOnError: false })
  const before = Date.now()
  const created = await tracker.track('k', 'fp')
  t.equal(created.status, 'created')
  t.ok(created.expiresAt >= before + 5_000 && created.expiresAt <= Date.now() + 5_000)
  const owner = (created as { owner: string }).owner
  t.equal(await tracker.putResponse('k', owner, { statusCode: 200, headers: {}, body: Buffer.from('x') }), true)
  const replay = await tracker.track('k', 'fp')
  t.equal(replay.status, 'completed')
  t.ok(replay.expiresAt >= before + 5_000 && replay.expiresAt <= Date.now() + 5_000)
  const other = await tracker.track('h', 'fp') as { owner: string }
  t.equal(await tracker.halt('h', other.owner), true)
  t.equal((await tracker.track('h', 'fp')).status, 'halted')
  t.same(tracker.defaults, { cacheTtl: 5_000, processingTtl: 1_000, releaseOnError: false })
  tracker.close()
})

t.test('gives every tracked request its own owner token, across trackers too', async (t) => {
  for (const [name, store] of [['one store', new MemoryStore()], ['another store', new FaultyStore()]] as const) {
    const first = new RequestTracker(store, { logger: recordingLogger(), ...options })
    const second = new RequestTracker(store, { logger: recordingLogger(), ...options })
    const owners = new Set<string>()
    for (let index = 0; index < 50; index++) {
      for (const tracker of [first, second]) {
        const result = await tracker.track(`k${index}-${owners.size}`, 'fp', options)
        t.match(result, { owner: /^[0-9a-f-]{36}\.[0-9a-z]+$/ }, `${name}: the owner's form`)
        owners.add((result as { owner: string }).owner)
      }
    }
    t.equal(owners.size, 100, `${name}: 100 owners`)
    first.close()
    second.close()
  }
})

import { randomBytes, randomUUID } from 'node:crypto'
import type { Test } from 'tap'
import type {
  IdempotencyRecord,
  IdempotencyStore,
  InsertResult,
  NewRecord,
  StoredResponse
} from '../../lib/index.js'

/** A store implementation under test, and how to build it and move its time. */
export interface ConformanceTarget {
  name: string
  /** A fresh store; one whose records are shared with other tests must still give each test unused keys. */
  create (): Promise<IdempotencyStore>
  /**
   * The time the store judges leases and expiry by, in ms since the epoch: the injected clock
   * of a memory store, `Date.now()` for a real server. Records' `expiresAt` are computed from it.
   */
  now (): number
  /** Moves the store's time forward by ms: moves an injected clock, or sleeps for a real server. */
  advance (ms: number): Promise<void>
  /** Tears a store down after each test (closes clients etc.). */
  destroy? (store: IdempotencyStore): Promise<void>
  /**
   * What `prune` is expected to count, default `'at-least'`:
   * - `'exact'`: the store is private to the test and keeps expired records until pruned;
   * - `'at-least'`: the store is shared, so a prune may also remove other tests' expired records;
   * - `'any'`: the server drops expired records by itself (e.g. key expiry), so a prune may find none.
   */
  pruneCount?: 'exact' | 'at-least' | 'any'
}

// Short enough for real servers that sleep, long enough to keep a margin for their round trips.
const LEASE = 100
const PAST_LEASE = 150
const LONG = 60_000

/**
 * Runs the behaviour every `IdempotencyStore` must have against one implementation.
 *
 * @example
 * runConformance(t, { name: 'memory', create: async () => new MemoryStore({ now: () => clock }), ... })
 */
export function runConformance (t: Test, target: ConformanceTarget): void {
  t.test(`${target.name} store conformance`, async (t) => {
    async function open (t: Test): Promise<IdempotencyStore> {
      const store = await target.create()
      if (target.destroy !== undefined) {
        const destroy = target.destroy
        t.teardown(() => destroy(store))
      }
      return store
    }

    function record (overrides: Partial<NewRecord> = {}): NewRecord {
      return {
        fingerprint: `fingerprint-${randomUUID()}`,
        owner: randomUUID(),
        expiresAt: target.now() + LONG,
        lease: LONG,
        takeOverExpiredLease: false,
        ...overrides
      }
    }

    function response (overrides: Partial<StoredResponse> = {}): StoredResponse {
      return {
        statusCode: 201,
        headers: {
          'content-type': 'application/json; charset=utf-8',
          'set-cookie': ['session=abc; Path=/', 'theme=dark; Path=/'],
          'x-order-count': 3
        },
        body: Buffer.from('{"order":1}'),
        ...overrides
      }
    }

    t.test('insert creates a processing record with no response', async (t) => {
      const store = await open(t)
      const key = uniqueKey('insert')
      const first = record()
      t.strictSame(await store.insert(key, first), { inserted: true })
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'processing',
        fingerprint: first.fingerprint,
        expiresAt: first.expiresAt,
        leaseExpired: false
      })
    })

    t.test('lookup of a key never inserted finds nothing', async (t) => {
      const store = await open(t)
      t.equal(await store.lookup(uniqueKey('unknown')), undefined)
    })

    t.test('records under different keys are independent', async (t) => {
      const store = await open(t)
      const one = record()
      const other = record()
      t.strictSame(await store.insert(uniqueKey('one'), one), { inserted: true })
      t.strictSame(await store.insert(uniqueKey('other'), other), { inserted: true })
    })

    t.test('a second insert of a key returns the existing record and does not replace it', async (t) => {
      const store = await open(t)
      const key = uniqueKey('second-insert')
      const first = record()
      const second = record({ expiresAt: target.now() + 2 * LONG, takeOverExpiredLease: true })
      await store.insert(key, first)
      const expected = {
        state: 'processing',
        fingerprint: first.fingerprint,
        expiresAt: first.expiresAt,
        leaseExpired: false
      }
      t.strictSame(comparableInsert(await store.insert(key, second)), { inserted: false, record: expected })
      t.strictSame(comparable(await store.lookup(key)), expected)
      t.equal(await store.update(key, second.owner, { state: 'processing', lease: LONG }), false, 'the second caller does not own it')
      t.equal(await store.update(key, first.owner, { state: 'processing', lease: LONG }), true, 'the first caller still owns it')
    })

    t.test('exactly one of 50 concurrent inserts of a key creates the record', async (t) => {
      const store = await open(t)
      const key = uniqueKey('race')
      const fingerprint = `fingerprint-${randomUUID()}`
      const records = Array.from({ length: 50 }, () => record({ fingerprint }))
      const results = await Promise.all(records.map((each) => store.insert(key, each)))
      const winners = results.flatMap((result, index) => result.inserted ? [index] : [])
      t.equal(winners.length, 1, 'one insert won')
      const winner = records[winners[0] as number] as NewRecord
      for (const result of results) {
        if (result.inserted) continue
        t.strictSame(comparable(result.record), {
          state: 'processing',
          fingerprint,
          expiresAt: winner.expiresAt,
          leaseExpired: false
        })
      }
      const renewed = await Promise.all(records.map((each) => store.update(key, each.owner, { state: 'processing', lease: LONG })))
      t.strictSame(
        renewed.flatMap((done, index) => done ? [index] : []),
        winners,
        'only the winner owns the record'
      )
    })

    t.test('completing stores the status, headers and body and moves expiresAt', async (t) => {
      const store = await open(t)
      const key = uniqueKey('complete')
      const first = record()
      await store.insert(key, first)
      const expiresAt = target.now() + 2 * LONG
      t.equal(await store.update(key, first.owner, { state: 'completed', response: response(), expiresAt }), true)
      const expected = {
        state: 'completed',
        fingerprint: first.fingerprint,
        expiresAt,
        leaseExpired: false,
        response: response()
      }
      const found = await store.lookup(key)
      t.strictSame(found, expected)
      t.ok(Buffer.isBuffer(found?.response?.body), 'the body is a Buffer')
      t.strictSame(await store.insert(key, record({ fingerprint: first.fingerprint })), { inserted: false, record: expected })
    })

    t.test('halting stores the halted state and moves expiresAt', async (t) => {
      const store = await open(t)
      const key = uniqueKey('halt')
      const first = record()
      await store.insert(key, first)
      const expiresAt = target.now() + 2 * LONG
      t.equal(await store.update(key, first.owner, { state: 'halted', expiresAt }), true)
      const expected = { state: 'halted', fingerprint: first.fingerprint, expiresAt, leaseExpired: false }
      t.strictSame(comparable(await store.lookup(key)), expected)
      t.strictSame(comparableInsert(await store.insert(key, record())), { inserted: false, record: expected })
    })

    t.test('renewing a lease keeps it from expiring', async (t) => {
      const store = await open(t)
      const key = uniqueKey('renew')
      const first = record({ lease: 2 * LEASE })
      await store.insert(key, first)
      await target.advance(1.2 * LEASE)
      t.equal(await store.update(key, first.owner, { state: 'processing', lease: 2 * LEASE }), true)
      await target.advance(1.2 * LEASE)
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'processing',
        fingerprint: first.fingerprint,
        expiresAt: first.expiresAt,
        leaseExpired: false
      }, 'the first lease has passed, the renewed one has not')
    })

    t.test('an update by another owner resolves false and changes nothing', async (t) => {
      const store = await open(t)
      const key = uniqueKey('not-owner')
      const first = record({ lease: LEASE })
      await store.insert(key, first)
      const stranger = randomUUID()
      const expiresAt = target.now() + 2 * LONG
      t.equal(await store.update(key, stranger, { state: 'completed', response: response(), expiresAt }), false)
      t.equal(await store.update(key, stranger, { state: 'halted', expiresAt }), false)
      t.equal(await store.update(key, stranger, { state: 'processing', lease: LONG }), false)
      await target.advance(PAST_LEASE)
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'processing',
        fingerprint: first.fingerprint,
        expiresAt: first.expiresAt,
        leaseExpired: true
      }, 'the stranger renewed nothing')
    })

    t.test('an update of a completed record resolves false and changes nothing', async (t) => {
      const store = await open(t)
      const key = uniqueKey('update-completed')
      const first = record()
      await store.insert(key, first)
      const expiresAt = target.now() + LONG
      await store.update(key, first.owner, { state: 'completed', response: response(), expiresAt })
      const later = target.now() + 2 * LONG
      const other = response({ statusCode: 500, headers: {}, body: Buffer.from('again') })
      t.equal(await store.update(key, first.owner, { state: 'completed', response: other, expiresAt: later }), false)
      t.equal(await store.update(key, first.owner, { state: 'halted', expiresAt: later }), false)
      t.equal(await store.update(key, first.owner, { state: 'processing', lease: LONG }), false)
      t.strictSame(await store.lookup(key), {
        state: 'completed',
        fingerprint: first.fingerprint,
        expiresAt,
        leaseExpired: false,
        response: response()
      })
    })

    t.test('an update of a halted record resolves false', async (t) => {
      const store = await open(t)
      const key = uniqueKey('update-halted')
      const first = record()
      await store.insert(key, first)
      const expiresAt = target.now() + LONG
      await store.update(key, first.owner, { state: 'halted', expiresAt })
      t.equal(await store.update(key, first.owner, { state: 'completed', response: response(), expiresAt }), false)
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'halted',
        fingerprint: first.fingerprint,
        expiresAt,
        leaseExpired: false
      })
    })

    t.test('an update of a key never inserted resolves false', async (t) => {
      const store = await open(t)
      const key = uniqueKey('update-unknown')
      t.equal(await store.update(key, randomUUID(), { state: 'processing', lease: LONG }), false)
      t.equal(await store.lookup(key), undefined, 'the update created nothing')
    })

    t.test('lookup and insert report a lapsed lease as leaseExpired', async (t) => {
      const store = await open(t)
      const key = uniqueKey('lapsed')
      const first = record({ lease: LEASE })
      await store.insert(key, first)
      await target.advance(PAST_LEASE)
      const expected = {
        state: 'processing',
        fingerprint: first.fingerprint,
        expiresAt: first.expiresAt,
        leaseExpired: true
      }
      t.strictSame(comparable(await store.lookup(key)), expected)
      t.strictSame(comparableInsert(await store.insert(key, record({ fingerprint: first.fingerprint }))), {
        inserted: false,
        record: expected
      }, 'without takeOverExpiredLease the lapsed record stays')
    })

    t.test('a lease lapsing never marks a finished record leaseExpired', async (t) => {
      const store = await open(t)
      const key = uniqueKey('finished-lease')
      const first = record({ lease: LEASE })
      await store.insert(key, first)
      const expiresAt = target.now() + LONG
      await store.update(key, first.owner, { state: 'completed', response: response(), expiresAt })
      await target.advance(PAST_LEASE)
      const expected = {
        state: 'completed',
        fingerprint: first.fingerprint,
        expiresAt,
        leaseExpired: false,
        response: response()
      }
      t.strictSame(await store.lookup(key), expected)
      t.strictSame(await store.insert(key, record({ fingerprint: first.fingerprint, takeOverExpiredLease: true })), {
        inserted: false,
        record: expected
      }, 'a completed record is never taken over')
    })

    t.test('takes over a lapsed lease for the same fingerprint', async (t) => {
      const store = await open(t)
      const key = uniqueKey('take-over')
      const first = record({ lease: LEASE })
      await store.insert(key, first)
      await target.advance(PAST_LEASE)
      const second = record({ fingerprint: first.fingerprint, expiresAt: target.now() + 2 * LONG, takeOverExpiredLease: true })
      t.strictSame(await store.insert(key, second), { inserted: true, tookOver: true }, 'the insert says it took over')
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'processing',
        fingerprint: second.fingerprint,
        expiresAt: second.expiresAt,
        leaseExpired: false
      }, 'the new record has a fresh lease')
      const expiresAt = target.now() + LONG
      t.equal(await store.update(key, first.owner, { state: 'completed', response: response(), expiresAt }), false, 'the old owner lost it')
      t.equal(await store.delete(key, first.owner), false, 'the old owner cannot delete it')
      t.equal(await store.update(key, second.owner, { state: 'completed', response: response(), expiresAt }), true, 'the new owner has it')
    })

    t.test('does not take over a lapsed lease for a different fingerprint', async (t) => {
      const store = await open(t)
      const key = uniqueKey('no-take-over')
      const first = record({ lease: LEASE })
      await store.insert(key, first)
      await target.advance(PAST_LEASE)
      t.strictSame(comparableInsert(await store.insert(key, record({ takeOverExpiredLease: true }))), {
        inserted: false,
        record: {
          state: 'processing',
          fingerprint: first.fingerprint,
          expiresAt: first.expiresAt,
          leaseExpired: true
        }
      })
      t.equal(await store.update(key, first.owner, { state: 'processing', lease: LONG }), true, 'the first owner still holds it')
    })

    t.test('never takes over a live lease', async (t) => {
      const store = await open(t)
      const key = uniqueKey('live-lease')
      const first = record()
      await store.insert(key, first)
      t.strictSame(comparableInsert(await store.insert(key, record({ fingerprint: first.fingerprint, takeOverExpiredLease: true }))), {
        inserted: false,
        record: {
          state: 'processing',
          fingerprint: first.fingerprint,
          expiresAt: first.expiresAt,
          leaseExpired: false
        }
      })
      t.equal(await store.update(key, first.owner, { state: 'processing', lease: LONG }), true, 'the first owner still holds it')
    })

    t.test('an expired processing record counts as absent for lookup, insert and update', async (t) => {
      const store = await open(t)
      const key = uniqueKey('expired-processing')
      const first = record({ expiresAt: target.now() + LEASE })
      await store.insert(key, first)
      await target.advance(PAST_LEASE)
      t.equal(await store.lookup(key), undefined)
      t.equal(await store.update(key, first.owner, { state: 'processing', lease: LONG }), false, 'the owner cannot renew it')
      const second = record()
      t.strictSame(await store.insert(key, second), { inserted: true })
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'processing',
        fingerprint: second.fingerprint,
        expiresAt: second.expiresAt,
        leaseExpired: false
      })
      t.equal(await store.update(key, first.owner, { state: 'halted', expiresAt: target.now() + LONG }), false, 'the old owner lost it')
    })

    t.test('an expired completed record counts as absent for lookup and insert', async (t) => {
      const store = await open(t)
      const key = uniqueKey('expired-completed')
      const first = record()
      await store.insert(key, first)
      await store.update(key, first.owner, { state: 'completed', response: response(), expiresAt: target.now() + LEASE })
      await target.advance(PAST_LEASE)
      t.equal(await store.lookup(key), undefined)
      const second = record({ fingerprint: first.fingerprint })
      t.strictSame(await store.insert(key, second), { inserted: true })
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'processing',
        fingerprint: second.fingerprint,
        expiresAt: second.expiresAt,
        leaseExpired: false
      })
    })

    t.test('the owner deletes its processing record', async (t) => {
      const store = await open(t)
      const key = uniqueKey('delete')
      const first = record()
      await store.insert(key, first)
      t.equal(await store.delete(key, first.owner), true)
      t.equal(await store.lookup(key), undefined)
      t.equal(await store.delete(key, first.owner), false, 'a second delete finds nothing')
      t.strictSame(await store.insert(key, record({ fingerprint: first.fingerprint })), { inserted: true }, 'a retry runs again')
    })

    t.test('another owner cannot delete a processing record', async (t) => {
      const store = await open(t)
      const key = uniqueKey('delete-stranger')
      const first = record()
      await store.insert(key, first)
      t.equal(await store.delete(key, randomUUID()), false)
      t.strictSame(comparable(await store.lookup(key)), {
        state: 'processing',
        fingerprint: first.fingerprint,
        expiresAt: first.expiresAt,
        leaseExpired: false
      })
    })

    t.test('a finished record cannot be deleted, even by its owner', async (t) => {
      const store = await open(t)
      const completedKey = uniqueKey('delete-completed')
      const haltedKey = uniqueKey('delete-halted')
      const completed = record()
      const halted = record()
      const expiresAt = target.now() + LONG
      await store.insert(completedKey, completed)
      await store.insert(haltedKey, halted)
      await store.update(completedKey, completed.owner, { state: 'completed', response: response(), expiresAt })
      await store.update(haltedKey, halted.owner, { state: 'halted', expiresAt })
      t.equal(await store.delete(completedKey, completed.owner), false)
      t.equal(await store.delete(haltedKey, halted.owner), false)
      t.strictSame(await store.lookup(completedKey), {
        state: 'completed',
        fingerprint: completed.fingerprint,
        expiresAt,
        leaseExpired: false,
        response: response()
      })
      t.equal((await store.lookup(haltedKey))?.state, 'halted')
    })

    t.test('a renewed lease keeps a running record alive past its expiresAt', async (t) => {
      const store = await open(t)
      const key = uniqueKey('renew-past-expiry')
      const first = record({ expiresAt: target.now() + LEASE, lease: LEASE })
      await store.insert(key, first)
      t.equal(await store.update(key, first.owner, { state: 'processing', lease: 3 * LEASE }), true)
      await target.advance(PAST_LEASE)
      const running = await store.lookup(key)
      t.equal(running?.state, 'processing', 'still there after its first expiresAt')
      t.equal(running?.leaseExpired, false)
      t.ok((running?.expiresAt ?? 0) >= target.now(), 'its expiry moved with the lease')
      t.strictSame(await store.insert(key, record({ fingerprint: first.fingerprint })), {
        inserted: false,
        record: { ...comparable(running), response: undefined }
      }, 'a retry sees it running')
    })

    t.test('an expired record cannot be deleted, even by its owner', async (t) => {
      const store = await open(t)
      const key = uniqueKey('delete-expired')
      const first = record({ expiresAt: target.now() + LEASE })
      await store.insert(key, first)
      await target.advance(PAST_LEASE)
      t.equal(await store.delete(key, first.owner), false)
      t.equal(await store.lookup(key), undefined)
    })

    t.test('a delete of a key never inserted resolves false', async (t) => {
      const store = await open(t)
      t.equal(await store.delete(uniqueKey('delete-unknown'), randomUUID()), false)
    })

    t.test('prune removes expired records, counts them and keeps live ones', async (t) => {
      const store = await open(t)
      const soon = target.now() + LEASE
      const expiring = [uniqueKey('prune-processing'), uniqueKey('prune-completed'), uniqueKey('prune-halted')]
      const owners = expiring.map(() => randomUUID())
      for (const [index, key] of expiring.entries()) {
        await store.insert(key, record({ owner: owners[index] as string, expiresAt: soon }))
      }
      await store.update(expiring[1] as string, owners[1] as string, { state: 'completed', response: response(), expiresAt: soon })
      await store.update(expiring[2] as string, owners[2] as string, { state: 'halted', expiresAt: soon })
      const live = uniqueKey('prune-live')
      const liveCompleted = uniqueKey('prune-live-completed')
      const kept = record()
      const keptCompleted = record()
      await store.insert(live, kept)
      await store.insert(liveCompleted, keptCompleted)
      await store.update(liveCompleted, keptCompleted.owner, { state: 'completed', response: response(), expiresAt: kept.expiresAt })
      await target.advance(PAST_LEASE)

      const removed = await store.prune()
      t.ok(Number.isInteger(removed), 'prune counts in whole records')
      const count = target.pruneCount ?? 'at-least'
      if (count === 'exact') t.equal(removed, expiring.length)
      else if (count === 'at-least') t.ok(removed >= expiring.length, `removed ${removed} >= ${expiring.length}`)
      else t.ok(removed >= 0, `removed ${removed} >= 0`)
      for (const key of expiring) t.equal(await store.lookup(key), undefined, `${key} is gone`)
      t.equal((await store.lookup(live))?.state, 'processing', 'the live processing record stays')
      t.equal((await store.lookup(liveCompleted))?.state, 'completed', 'the live completed record stays')
      if (count !== 'at-least') t.equal(await store.prune(), 0, 'a second prune finds nothing')
    })

    t.test('returns a binary body byte for byte', async (t) => {
      const store = await open(t)
      const key = uniqueKey('binary')
      const first = record()
      // NUL, a lone continuation byte and a truncated sequence: none of it is valid UTF-8.
      const body = Buffer.concat([Buffer.from([0x00, 0xff, 0x80, 0xc3, 0x28, 0xe2, 0x82, 0x00]), randomBytes(64 * 1024)])
      await store.insert(key, first)
      const expiresAt = target.now() + LONG
      const stored = response({ headers: { 'content-type': 'application/octet-stream' }, body: Buffer.from(body) })
      t.equal(await store.update(key, first.owner, { state: 'completed', response: stored, expiresAt }), true)
      const found = await store.lookup(key)
      t.ok(Buffer.isBuffer(found?.response?.body), 'the body is a Buffer')
      t.equal(found?.response?.body.length, body.length)
      t.ok(body.equals(found?.response?.body as Buffer), 'lookup returns the same bytes')
      const again = await store.insert(key, record({ fingerprint: first.fingerprint }))
      t.ok(!again.inserted && body.equals(again.record.response?.body as Buffer), 'insert returns the same bytes')
    })

    t.test('keeps a string body as its UTF-8 bytes', async (t) => {
      const store = await open(t)
      const key = uniqueKey('text')
      const first = record()
      const text = '{"name":"Zoë","note":"€ and 😀"}'
      await store.insert(key, first)
      const stored = response({ headers: { 'content-type': 'application/json' }, body: text })
      t.equal(await store.update(key, first.owner, { state: 'completed', response: stored, expiresAt: target.now() + LONG }), true)
      const found = (await store.lookup(key))?.response?.body
      t.ok(found !== undefined && Buffer.from(found).equals(Buffer.from(text)), 'the body holds the string\'s UTF-8 bytes')
    })

    t.test('returns an empty body as an empty Buffer', async (t) => {
      const store = await open(t)
      const key = uniqueKey('empty')
      const first = record()
      await store.insert(key, first)
      const expiresAt = target.now() + LONG
      const stored: StoredResponse = { statusCode: 204, headers: {}, body: Buffer.alloc(0) }
      await store.update(key, first.owner, { state: 'completed', response: stored, expiresAt })
      const found = await store.lookup(key)
      t.ok(Buffer.isBuffer(found?.response?.body), 'the body is a Buffer')
      t.strictSame(found?.response, { statusCode: 204, headers: {}, body: Buffer.alloc(0) })
    })

    t.test('lookup tells an operator when a running record\'s lease ends, when it was created and by which request', async (t) => {
      const store = await open(t)
      const key = uniqueKey('origin')
      const identity = { method: 'POST', route: '/orders/:id', params: { id: '42' }, constraints: { version: '2.0.0' }, key: 'client-key', scope: 'user-1' }
      const createdAt = target.now()
      const first = record({ lease: LONG, identity, createdAt })
      await store.insert(key, first)
      const running = await store.lookup(key)
      t.strictSame(running?.identity, identity)
      t.equal(running?.createdAt, createdAt)
      t.ok(Math.abs((running?.leaseExpiresAt as number) - (createdAt + LONG)) < 5_000, 'the lease ends a lease from now, by the store clock')
      await store.update(key, first.owner, { state: 'halted', expiresAt: target.now() + LONG })
      const halted = await store.lookup(key)
      t.strictSame([halted?.identity, halted?.createdAt, halted?.leaseExpiresAt], [identity, createdAt, undefined], 'a halted record keeps its origin')
      const completedKey = uniqueKey('origin-completed')
      const second = record({ identity, createdAt })
      await store.insert(completedKey, second)
      await store.update(completedKey, second.owner, { state: 'completed', response: response(), expiresAt: target.now() + LONG })
      const completed = await store.lookup(completedKey)
      t.strictSame([completed?.identity, completed?.createdAt, completed?.leaseExpiresAt], [undefined, undefined, undefined], 'a completed record keeps no origin')
    })

    t.test('remove deletes a completed, halted or lapsed record, whoever owns it, and never one that still runs', async (t) => {
      const store = await open(t)
      const remove = store.remove?.bind(store)
      if (remove === undefined) throw new Error(`${target.name} store has no remove`)
      const running = uniqueKey('remove-running')
      const owner = record({ lease: LONG })
      await store.insert(running, owner)
      t.equal(await remove(running), false, 'a record whose lease is live is left')
      t.equal((await store.lookup(running))?.state, 'processing')
      t.equal(await store.update(running, owner.owner, { state: 'completed', response: response(), expiresAt: target.now() + LONG }), true, 'its owner still completes it')
      const states = ['processing', 'halted', 'completed'] as const
      for (const state of states) {
        const key = uniqueKey(`remove-${state}`)
        const first = record({ lease: LEASE })
        await store.insert(key, first)
        if (state === 'processing') await target.advance(PAST_LEASE)
        if (state === 'halted') await store.update(key, first.owner, { state, expiresAt: target.now() + LONG })
        if (state === 'completed') await store.update(key, first.owner, { state, response: response(), expiresAt: target.now() + LONG })
        t.equal(await remove(key), true, `a ${state === 'processing' ? 'lapsed' : state} record is removed`)
        t.equal(await store.lookup(key), undefined, `the ${state} record is gone`)
        t.equal(await remove(key), false, 'removing it again finds nothing')
        t.strictSame(await store.insert(key, record()), { inserted: true }, `a new request after a removed ${state} record runs`)
      }
    })

    t.test('list pages through halted records and lapsed leases, and nothing else', async (t) => {
      const store = await open(t)
      const list = store.list?.bind(store)
      if (list === undefined) throw new Error(`${target.name} store has no list`)
      const run = randomUUID()
      const ours = (label: string): string => uniqueKey(`list-${run}-${label}`)
      const identity = (label: string) => ({ method: 'POST', route: '/list', key: label })
      const keys = { halted: [ours('h1'), ours('h2'), ours('h3')], lapsed: [ours('l1'), ours('l2')], running: ours('r'), completed: ours('c'), haltedExpired: ours('he') }
      for (const key of [...keys.halted, keys.haltedExpired]) {
        const first = record({ identity: identity(key), createdAt: target.now() })
        await store.insert(key, first)
        await store.update(key, first.owner, { state: 'halted', expiresAt: target.now() + (key === keys.haltedExpired ? LEASE : LONG) })
      }
      for (const key of keys.lapsed) await store.insert(key, record({ lease: LEASE, identity: identity(key), createdAt: target.now() }))
      await store.insert(keys.running, record({ lease: LONG }))
      const completed = record()
      await store.insert(keys.completed, completed)
      await store.update(keys.completed, completed.owner, { state: 'completed', response: response(), expiresAt: target.now() + LONG })
      await target.advance(PAST_LEASE)

      async function all (state: 'halted' | 'lapsed' | undefined) {
        const found = new Map<string, unknown>()
        let cursor: string | undefined
        for (let page = 0; page < 10_000; page++) {
          const listed = await (list as NonNullable<IdempotencyStore['list']>)({ state, limit: 2, cursor })
          t.ok(listed.records.length <= 2, 'a page holds at most limit records')
          for (const entry of listed.records) if (entry.key.includes(run)) found.set(entry.key, entry)
          cursor = listed.cursor
          if (cursor === undefined) break
        }
        return found
      }
      const halted = await all('halted')
      t.strictSame([...halted.keys()].sort(), [...keys.halted].sort(), 'halted: the live halted records')
      t.match(halted.get(keys.halted[0] as string), { state: 'halted', leaseExpired: false, identity: identity(keys.halted[0] as string), createdAt: Number })
      const lapsed = await all('lapsed')
      t.strictSame([...lapsed.keys()].sort(), [...keys.lapsed].sort(), 'lapsed: the processing records whose lease lapsed')
      t.match(lapsed.get(keys.lapsed[0] as string), { state: 'processing', leaseExpired: true, identity: identity(keys.lapsed[0] as string) })
      const both = await all(undefined)
      t.strictSame([...both.keys()].sort(), [...keys.halted, ...keys.lapsed].sort(), 'by default: both')
    })

    t.test('list skips no record when others are removed between its pages', async (t) => {
      const store = await open(t)
      const list = store.list?.bind(store)
      const remove = store.remove?.bind(store)
      if (list === undefined || remove === undefined) throw new Error(`${target.name} store has no list or remove`)
      const run = randomUUID()
      const keys = ['a', 'b', 'c', 'd', 'e'].map((label) => uniqueKey(`paging-${run}-${label}`))
      for (const key of keys) {
        const first = record({ createdAt: target.now() })
        await store.insert(key, first)
        await store.update(key, first.owner, { state: 'halted', expiresAt: target.now() + LONG })
      }
      const seen = new Set<string>()
      let cursor: string | undefined
      for (let page = 0; page < 10_000; page++) {
        const listed = await list({ state: 'halted', limit: 1, cursor })
        for (const entry of listed.records) {
          if (!entry.key.includes(run)) continue
          seen.add(entry.key)
          // The operator acts on each record as it is listed.
          t.equal(await remove(entry.key), true)
        }
        cursor = listed.cursor
        if (cursor === undefined) break
      }
      t.strictSame([...seen].sort(), [...keys].sort(), 'every record was listed')
    })

    t.test('an identity kept with a record reads back as the same request, a host pattern included', async (t) => {
      const store = await open(t)
      const key = uniqueKey('pattern')
      const identity = { method: 'POST', route: '/orders', constraints: { host: /^(?<tenant>[a-z]+)\.example\.com$/i }, key: 'k' }
      const first = record({ identity, createdAt: target.now() })
      await store.insert(key, first)
      const found = (await store.lookup(key))?.identity
      t.ok(found?.constraints?.host instanceof RegExp, 'a RegExp again')
      t.equal(String(found?.constraints?.host), String(identity.constraints.host))
    })
  })
}

function uniqueKey (label: string): string {
  return `conformance:${label}:${randomUUID()}`
}

/** Stores may leave `response` out or set it to undefined; compare records either way. */
// The fields every record has; what lookup adds for operators (lease end, origin) is tested on its own.
function comparable (record: IdempotencyRecord | undefined): Omit<IdempotencyRecord, 'response'> | IdempotencyRecord | undefined {
  if (record === undefined) return record
  const { response, leaseExpiresAt: _lease, createdAt: _created, identity: _identity, ...rest } = record
  return response === undefined ? rest : { ...rest, response }
}

function comparableInsert (result: InsertResult): object {
  return result.inserted ? result : { inserted: false, record: comparable(result.record) }
}

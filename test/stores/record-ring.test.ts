import t from 'tap'
import { MemoryStore } from '../../lib/stores/memory.js'
import { RecordRing, textBytes, type RingCursor, type RingRecord } from '../../lib/stores/record-ring.js'
import type { IdempotencyRecord, RecordState, StoredResponse } from '../../lib/stores/store.js'

// The ring's layout and the memory store's accounting, as the tests below rely on them.
const HEADER_BYTES = 56
const BODY_LIMIT = 16 * 1024
const ENTRY_OVERHEAD = 160

/** mulberry32: a small seeded generator, so that a failing run replays from its seed. */
function mulberry32 (seed: number): () => number {
  let state = seed >>> 0
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let mixed = state
    mixed = Math.imul(mixed ^ (mixed >>> 15), mixed | 1)
    mixed ^= mixed + Math.imul(mixed ^ (mixed >>> 7), mixed | 61)
    return ((mixed ^ (mixed >>> 14)) >>> 0) / 4294967296
  }
}

function pick<Item> (random: () => number, items: readonly Item[]): Item {
  return items[Math.floor(random() * items.length)] as Item
}

function bodyBytes (body: Buffer | string): number {
  return typeof body === 'string' ? textBytes(body) : body.byteLength
}

/** Bytes a record takes in the ring. */
function recordLength (key: string, fingerprint: string, body: Buffer | string): number {
  return (HEADER_BYTES + textBytes(key) + textBytes(fingerprint) + bodyBytes(body) + 7) & ~7
}

function ringRecord (body: Buffer | string, fields: Partial<Omit<RingRecord, 'body' | 'bodyBytes'>> = {}): RingRecord {
  return { expiresAt: 1000, sequence: 0, size: 0, headersId: 0, statusCode: 200, fingerprint: '', ...fields, body, bodyBytes: bodyBytes(body) }
}

/** A ring that keeps the sequence numbers of the live records it dropped, in the order it dropped them. */
function droppingRing (maxCapacity: number, maxCount = maxCapacity): { ring: RecordRing, dropped: number[] } {
  const dropped: number[] = []
  const ring: RecordRing = new RecordRing(maxCapacity, maxCount, (at) => { dropped.push(ring.sequence(at)) })
  return { ring, dropped }
}

/** Adds a record under the ASCII `key`, with an empty fingerprint and a body that makes it exactly `length` bytes. */
function addSized (ring: RecordRing, key: string, length: number, sequence: number): number {
  return ring.add(key, ring.hash(key), ringRecord('x'.repeat(length - HEADER_BYTES - key.length), { sequence }))
}

/** The sequence numbers of the records a walk visits from `cursor` to its end. */
function walk (ring: RecordRing, cursor: RingCursor = ring.cursor()): number[] {
  const seen: number[] = []
  for (let at = ring.next(cursor); at >= 0; at = ring.next(cursor)) seen.push(ring.sequence(at))
  return seen
}

function range (from: number, to: number): number[] {
  return Array.from({ length: to - from }, (_, index) => from + index)
}

/** What differs between the record at `at` and `record`, or undefined. */
function ringMismatch (ring: RecordRing, at: number, record: RingRecord): string | undefined {
  const fields = {
    expiresAt: ring.expiresAt(at),
    sequence: ring.sequence(at),
    size: ring.size(at),
    headersId: ring.headersId(at),
    statusCode: ring.statusCode(at),
    fingerprint: ring.fingerprint(at)
  }
  for (const [name, value] of Object.entries(fields)) {
    if (!Object.is(value, record[name as keyof typeof fields])) return `${name} ${JSON.stringify(value)}, stored ${JSON.stringify(record[name as keyof typeof fields])}`
  }
  if (!ring.hasFingerprint(at, record.fingerprint)) return 'hasFingerprint denies its own fingerprint'
  const other = [...TEXTS, `${record.fingerprint}x`, record.fingerprint.slice(1)].find((text) => text !== record.fingerprint && ring.hasFingerprint(at, text))
  if (other !== undefined) return `hasFingerprint claims ${JSON.stringify(other)} for ${JSON.stringify(record.fingerprint)}`
  const body = ring.body(at)
  if (typeof record.body === 'string') {
    return body === record.body ? undefined : `body ${JSON.stringify(body).slice(0, 60)}, stored ${JSON.stringify(record.body).slice(0, 60)}`
  }
  return Buffer.isBuffer(body) && body.equals(record.body) ? undefined : `body ${String(body).slice(0, 60)}, stored a Buffer of ${record.body.byteLength} bytes`
}

const TEXTS = ['', 'a', 'plain ascii', 'é', '€', '😀', '\uD800', 'x\uDC00y', 'ÿ', '\u0100', '\u0000\u007f', 'k'.repeat(65), 'é'.repeat(65), 'a'.repeat(100) + '€', '\uD800'.repeat(70)]

t.test('textBytes counts one byte a character for ASCII and two for any other text, short or long', async (t) => {
  const cases: Array<[string, number]> = [
    ['', 0], ['abc', 3], ['\u007f', 1], ['é', 2], ['ÿa', 4], ['😀', 4], ['\uD800', 2],
    ['a'.repeat(100), 100], ['a'.repeat(99) + 'é', 200], ['a'.repeat(99) + '\uD800', 200]
  ]
  t.strictSame(cases.map(([text]) => textBytes(text)), cases.map(([, bytes]) => bytes))
})

t.test('a record comes back with every field as it was stored, whatever the text of its key, fingerprint and body', async (t) => {
  const { ring, dropped } = droppingRing(1024 * 1024)
  const bodies: Array<Buffer | string> = [
    ...TEXTS,
    Buffer.alloc(0),
    Buffer.from([0, 1, 255]),
    Buffer.alloc(BODY_LIMIT, 7),
    Buffer.alloc(64 * 1024, 5).subarray(10, 30),
    'é'.repeat(BODY_LIMIT / 2)
  ]
  const expiries = [1.5, 1e20, Infinity, -1, 0, 1_700_000_000_000.25]
  const stored = bodies.map((body, index) => {
    const key = index < TEXTS.length ? TEXTS[index] as string : `${TEXTS[index - TEXTS.length] as string}${index}`
    const record = ringRecord(body, {
      expiresAt: expiries[index % expiries.length] as number,
      sequence: index * 7,
      size: 4_000_000_000 + index,
      headersId: index,
      statusCode: 100 + index,
      fingerprint: TEXTS[(index + 3) % TEXTS.length] as string
    })
    return { key, record, at: ring.add(key, ring.hash(key), record) }
  })
  t.strictSame(stored.filter(({ at }) => at < 0 || at % 8 !== 0).map(({ key }) => key), [], 'every record is taken, at an offset aligned to 8 bytes')
  t.equal(ring.count, stored.length)
  const mismatches = (records: typeof stored): string[] => records.flatMap(({ key, record, at }) => {
    const found = ring.find(key, ring.hash(key))
    if (found !== at) return [`${JSON.stringify(key)} found at ${found}, stored at ${at}`]
    const mismatch = ringMismatch(ring, at, record)
    return mismatch === undefined ? [] : [`${JSON.stringify(key)}: ${mismatch}`]
  })
  t.strictSame(mismatches(stored), [])
  t.equal(ring.find('never stored', ring.hash('never stored')), -1)

  const [removed, kept] = [stored.filter((_, index) => index % 2 === 0), stored.filter((_, index) => index % 2 === 1)]
  for (const { at } of removed) ring.remove(at)
  t.strictSame(removed.filter(({ key }) => ring.find(key, ring.hash(key)) !== -1).map(({ key }) => key), [], 'a removed record is not found')
  t.strictSame(mismatches(kept), [], 'the others are, intact')
  t.equal(ring.count, kept.length)
  t.strictSame(dropped, [])
})

t.test('a record whose body is over 16 KiB, or that is larger than half the ring, is left to the caller', async (t) => {
  const { ring } = droppingRing(1024 * 1024)
  t.equal(ring.add('buffer', ring.hash('buffer'), ringRecord(Buffer.alloc(BODY_LIMIT + 1))), -1)
  t.equal(ring.add('text', ring.hash('text'), ringRecord('x'.repeat(BODY_LIMIT + 1))), -1)
  t.equal(ring.add('wide', ring.hash('wide'), ringRecord('é'.repeat(BODY_LIMIT / 2 + 1))), -1, 'two-byte text counts two bytes a character')
  t.equal(ring.count, 0)
  t.equal(ring.find('buffer', ring.hash('buffer')), -1)

  const small = droppingRing(2048).ring
  t.ok(addSized(small, 'k', 1024, 1) >= 0, 'a record of exactly half the ring is taken')
  t.equal(small.add('j', small.hash('j'), ringRecord('x'.repeat(1024 - HEADER_BYTES))), -1, 'one 8 bytes larger is not')
  t.equal(small.count, 1)

  const odd = new RecordRing(1030, 100, () => {})
  t.equal(odd.maxCapacity, 1024, 'the maximum is rounded down to a multiple of 8')
})

t.test('keys of one length are told apart when one is ASCII and the other UTF-16, or both UTF-16, whatever their hash', async (t) => {
  // Every key under one hash: only the comparison of keys tells them apart.
  const HASH = 42
  const { ring } = droppingRing(64 * 1024)
  const add = (key: string): number => ring.add(key, HASH, ringRecord(`body of ${key}`))
  const find = (key: string): number => ring.find(key, HASH)
  const wide = add('é€')
  t.equal(find('é€'), wide)
  t.equal(find('ab'), -1, 'an ASCII key of the same length')
  t.equal(find('€é'), -1, 'a UTF-16 key of the same length and other characters')
  t.equal(find('é'), -1, 'a UTF-16 prefix')
  t.equal(find('abcd'), -1, 'an ASCII key of as many bytes')
  const ascii = add('ab')
  t.equal(find('ab'), ascii, 'the ASCII key is found past the UTF-16 one')
  t.equal(find('é€'), wide)
  t.equal(find('aé'), -1, 'a UTF-16 key of the same length, ASCII at first')
  t.equal(find('ac'), -1)
  // '扡' is U+6261: in UTF-16 LE, the bytes 61 62 of 'ab' in Latin-1.
  t.equal(find('扡'), -1, 'a UTF-16 key whose bytes spell the ASCII key')
  const spelled = add('扡')
  t.equal(find('扡'), spelled)
  t.equal(find('ab'), ascii, 'nor the other way round')
  const surrogate = add('\uD800')
  t.equal(find('\uDC00'), -1, 'lone surrogates are compared unit by unit')
  t.equal(find('\uD800'), surrogate)
  const empty = add('')
  t.equal(find(''), empty, 'the empty key')
  t.strictSame([wide, ascii, spelled, surrogate, empty].map((at) => ring.body(at)), ['body of é€', 'body of ab', 'body of 扡', 'body of \uD800', 'body of '])
  ring.remove(wide)
  t.strictSame([find('é€'), find('ab'), find('扡'), find('\uD800'), find('')], [-1, ascii, spelled, surrogate, empty])
})

t.test('records whose hashes collide, and wrap around the end of the index, are all found whatever order others are removed in', async (t) => {
  // A ring of 512 records has 1024 index slots: these hashes crowd its last slots and its first,
  // and negative ones land there too.
  const hashes = [1022, 1022, 1023, 0, -1, 1022, 0, 1, 3, -1024, 0x7fffffff, 2, 1023, 5, 1]
  const random = mulberry32(7)
  const failures: string[] = []
  for (let order = 0; order < 80; order++) {
    // Half the time, a larger index, where the crowd lands elsewhere, among other records.
    const { ring, dropped } = droppingRing(1024 * 1024, order % 2 === 1 ? 1024 : 512)
    if (order % 2 === 1) for (let index = 0; index < 600; index++) ring.add(`filler${index}`, ring.hash(`filler${index}`), ringRecord(''))
    const records = hashes.map((hash, index) => ({ key: `c${index}`, hash, at: ring.add(`c${index}`, hash, ringRecord(`body ${index}`, { sequence: index })) }))
    const remaining = [...records]
    while (remaining.length > 0) {
      const [removed] = remaining.splice(Math.floor(random() * remaining.length), 1) as [typeof records[number]]
      ring.remove(removed.at)
      if (ring.find(removed.key, removed.hash) !== -1) failures.push(`order ${order}: ${removed.key} found after removal`)
      for (const { key, hash, at } of remaining) {
        const found = ring.find(key, hash)
        if (found !== at || ring.body(found) !== `body ${key.slice(1)}`) failures.push(`order ${order}: ${key} found at ${found}, not ${at}, after ${removed.key} was removed`)
      }
    }
    if (ring.count !== (order % 2 === 1 ? 600 : 0) || dropped.length > 0) failures.push(`order ${order}: count ${ring.count}, dropped ${dropped.length}`)
  }
  t.strictSame(failures, [])
})

t.test('records fill the ring to its end, then wrap to its start past padding, and the oldest are dropped when there is no room', async (t) => {
  const { ring, dropped } = droppingRing(1024)
  // Five records of 200 bytes: 24 bytes are left at the end, too few for another.
  t.strictSame(range(0, 5).map((index) => addSized(ring, `r${index}`, 200, index)), [0, 200, 400, 600, 800])
  t.equal(ring.oldest(), 0)
  ring.remove(0)
  t.equal(ring.oldest(), 200, 'the oldest is the next record once the first is removed')
  ring.remove(200)
  t.equal(ring.oldest(), 400)
  t.equal(addSized(ring, 'r5', 200, 5), 0, 'a record that does not fit at the end goes to the start')
  t.strictSame(dropped, [], 'where two records were removed: nothing is dropped')
  t.equal(ring.count, 4)
  t.strictSame(walk(ring), [2, 3, 4, 5], 'a walk goes over the padding, oldest first')
  t.equal(addSized(ring, 'r6', 200, 6), 200)
  t.strictSame(dropped, [])
  t.equal(addSized(ring, 'r7', 200, 7), 400, 'the full ring drops its oldest record and reuses its bytes')
  t.strictSame(dropped, [2])
  t.equal(addSized(ring, 'r8', 200, 8), 600)
  t.equal(addSized(ring, 'r9', 200, 9), 800)
  t.strictSame(dropped, [2, 3, 4])
  t.equal(addSized(ring, 'r10', 200, 10), 0, 'the old padding goes, and the oldest record with it, to make room at the start')
  t.strictSame(dropped, [2, 3, 4, 5], 'padding is not told as a dropped record')
  t.equal(ring.oldest(), 200)
  t.equal(ring.count, 5)
  t.strictSame(range(0, 11).map((index) => ring.find(`r${index}`, ring.hash(`r${index}`))), [-1, -1, -1, -1, -1, -1, 200, 400, 600, 800, 0])
  t.strictSame(walk(ring), [6, 7, 8, 9, 10])
  t.equal(ring.body(800), 'x'.repeat(200 - HEADER_BYTES - 2), 'a record next to the padding is intact')
})

t.test('a body read from the ring is a copy, which the records that reuse its bytes leave as it was', async (t) => {
  const { ring } = droppingRing(1024)
  const at = ring.add('first', ring.hash('first'), ringRecord(Buffer.alloc(400, 1)))
  const read = ring.body(at)
  ring.remove(at)
  ring.add('second', ring.hash('second'), ringRecord(Buffer.alloc(400, 2)))
  ring.add('third', ring.hash('third'), ringRecord(Buffer.alloc(400, 3)))
  t.equal(ring.find('second', ring.hash('second')), at, 'the bytes were reused')
  t.strictSame(read, Buffer.alloc(400, 1))
})

t.test('oldest() answers the oldest live record, past removed ones, and -1 when there is none', async (t) => {
  const { ring } = droppingRing(64 * 1024)
  t.equal(ring.oldest(), -1, 'a new ring')
  const offsets = range(0, 4).map((index) => addSized(ring, `o${index}`, 64, index))
  ring.remove(offsets[1] as number)
  ring.remove(offsets[2] as number)
  t.equal(ring.oldest(), offsets[0], 'records removed after the oldest do not change it')
  ring.remove(offsets[0] as number)
  t.equal(ring.oldest(), offsets[3], 'removing the oldest passes the removed records after it')
  ring.remove(offsets[3] as number)
  t.equal(ring.oldest(), -1, 'an emptied ring')
  t.equal(ring.count, 0)
  t.equal(addSized(ring, 'again', 64, 9), 0, 'an empty ring starts again at its start')
  t.equal(ring.oldest(), 0)
})

t.test('a ring holds at most maxCount live records: it drops its oldest rather than hold more', async (t) => {
  const { ring, dropped } = droppingRing(1024 * 1024, 100)
  const cursor = ring.cursor()
  for (let index = 0; index < 250; index++) {
    addSized(ring, `c${index}`, 64, index)
    if (index < 3) ring.next(cursor)
  }
  t.equal(ring.count, 100)
  t.strictSame(dropped, range(0, 150), 'the oldest, in order')
  t.strictSame(range(0, 250).filter((index) => {
    const at = ring.find(`c${index}`, ring.hash(`c${index}`))
    return index < 150 ? at !== -1 : at < 0 || ring.sequence(at) !== index
  }), [], 'the newest 100 are found, and only they')
  t.strictSame(walk(ring, cursor), range(150, 250), 'a walk the oldest records dropped from under goes on from the oldest live one')
  ring.remove(ring.find('c200', ring.hash('c200')))
  addSized(ring, 'after', 64, 250)
  t.strictSame(dropped.length, 150, 'a record removed makes room for one more')
})

t.test('the room of a record removed before its turn is taken again only when the ring comes round to it', async (t) => {
  const { ring, dropped } = droppingRing(1024)
  const offsets = range(0, 16).map((index) => addSized(ring, `k${index}`, 64, index))
  t.strictSame(offsets, range(0, 16).map((index) => index * 64), 'exactly full')
  // Every odd record goes: half the ring, but never the oldest, so nothing is taken again yet.
  for (let index = 1; index < 16; index += 2) ring.remove(offsets[index] as number)
  t.equal(addSized(ring, 'new', 64, 100), 0, 'the new record takes the oldest one\'s room')
  t.strictSame(dropped, [0], 'which is dropped though half the ring is removed records')
  t.equal(addSized(ring, 'next', 64, 101), 64, 'the removed record after it is taken again')
  t.strictSame(dropped, [0])
  t.strictSame(walk(ring), [2, 4, 6, 8, 10, 12, 14, 100, 101])
  t.strictSame(range(0, 16).filter((index) => {
    const at = ring.find(`k${index}`, ring.hash(`k${index}`))
    return index % 2 === 0 && index > 0 ? at !== offsets[index] || ring.body(at) !== 'x'.repeat(64 - HEADER_BYTES - `k${index}`.length) : at !== -1
  }), [], 'no record moved')
})

t.test('keys chosen to collide under an unkeyed hash spread over the index like any others', async (t) => {
  // Pairs of blocks that leave 32-bit FNV-1a in the same state from any state whose low 7 bits
  // are 0: the 2^12 keys built of them all collide under FNV-1a, seeded or not, for 1 seed in 128.
  const pairs = [
    ['%elt13', ')K"0H('], ['*s-&+v', '~X%l`&'], ['/?.Erp', 'x+uRs@'], ['Gro~zA', 'XF#IJo'], ['[4n8S`', 'R\\Lmr;'], ['+:.xDC', '/ORHFH'],
    ['[MB\'45', ']JGNB0'], ['a+SL?p', 'LeFW**'], ['0~gQSo', 'KM_XW@'], ['5O,+L,', '<;+c^('], ['Y+VGlW', 'npnk/<'], ['B$N+~g', '?k+a:n']
  ]
  const keys = range(0, 2 ** pairs.length).map((bits) => pairs.map((pair, index) => pair[(bits >> index) & 1]).join(''))
  const fnv = (key: string): number => {
    let hash = 0
    for (let index = 0; index < key.length; index++) hash = Math.imul(hash ^ key.charCodeAt(index), 0x01000193)
    return hash
  }
  t.equal(new Set(keys.map(fnv)).size, 1, 'one FNV-1a hash for all of them')
  // Each ring has a key of its own: under a seeded FNV-1a, about 4 of 512 rings would see them collide.
  const crowded = range(0, 512).filter(() => {
    const ring = new RecordRing(1024, 1, () => {})
    return new Set(keys.map((key) => ring.hash(key))).size < keys.length * 0.99
  })
  t.equal(crowded.length, 0, 'under the ring\'s own hash they are all but all distinct, whatever its key')
  const ring = new RecordRing(4 * 1024 * 1024, 2 ** 14, () => {})
  for (const [index, key] of keys.entries()) ring.add(key, ring.hash(key), ringRecord('', { sequence: index }))
  const started = process.hrtime.bigint()
  for (const key of keys) ring.find(`${key}?`, ring.hash(`${key}?`))
  const perLookup = Number(process.hrtime.bigint() - started) / keys.length
  t.ok(perLookup < 20_000, `a lookup among them takes ${perLookup.toFixed(0)} ns`)
})

t.test('a walk sees every live record once, oldest first, while records are removed and added around it', async (t) => {
  const { ring } = droppingRing(64 * 1024)
  const offsets = range(0, 10).map((index) => addSized(ring, `w${index}`, 64, index))
  const cursor = ring.cursor()
  const seen = [ring.next(cursor), ring.next(cursor), ring.next(cursor)].map((at) => ring.sequence(at))
  ring.remove(offsets[0] as number)
  ring.remove(offsets[5] as number)
  ring.remove(offsets[3] as number)
  addSized(ring, 'w10', 64, 10)
  seen.push(...walk(ring, cursor))
  t.strictSame(seen, [0, 1, 2, 4, 6, 7, 8, 9, 10], 'records removed ahead of it are skipped, and one added meanwhile joins')
  t.equal(ring.next(cursor), -1, 'a walk at its end stays there')
  addSized(ring, 'w11', 64, 11)
  t.equal(ring.sequence(ring.next(cursor)), 11, 'until a record is added')
})

t.test('a walk that the oldest records dropped from under goes on from the oldest live record', async (t) => {
  const { ring, dropped } = droppingRing(1024)
  for (let index = 0; index < 16; index++) addSized(ring, `h${index}`, 64, index)
  const cursor = ring.cursor()
  t.strictSame([ring.next(cursor), ring.next(cursor)].map((at) => ring.sequence(at)), [0, 1])
  for (let index = 16; index < 20; index++) addSized(ring, `h${index}`, 64, index)
  t.strictSame(dropped, [0, 1, 2, 3])
  t.strictSame(walk(ring, cursor), range(4, 20), 'neither the dropped records nor the bytes that replaced them are visited twice')
})

t.test('a walk that stood at the end of an emptied ring sees the records added after it', async (t) => {
  const { ring } = droppingRing(64 * 1024)
  ring.remove(ring.add('a', ring.hash('a'), ringRecord('x'.repeat(100))))
  const cursor = ring.cursor()
  // The walk stands at offset 160, inside the new record's body: there, 'y' bytes read as a huge
  // length, on which the walk ends, where zeros would read as 0 and hold it in place for ever.
  const added = ring.add('b', ring.hash('b'), ringRecord('y'.repeat(300)))
  t.equal(added, 0, 'the emptied ring starts again at its start')
  t.equal(ring.next(cursor), added, 'the walk sees the new record')
  t.equal(ring.next(cursor), -1)
})

interface RingModelRecord {
  key: string
  hash: number
  record: RingRecord
}

function oldestOf (model: Map<string, RingModelRecord>): RingModelRecord | undefined {
  let oldest: RingModelRecord | undefined
  for (const entry of model.values()) if (oldest === undefined || entry.record.sequence < oldest.record.sequence) oldest = entry
  return oldest
}

/** Random adds, removals, finds and walks of a ring against a Map; throws with the step that went wrong. */
function fuzzRing (seed: number, steps: number): void {
  const random = mulberry32(seed)
  const maxCapacity = pick(random, [1024, 2048, 4096, 65536, 200_000])
  const model = new Map<string, RingModelRecord>()
  let step = 0
  const fail = (message: string): never => { throw new Error(`ring seed ${seed}, step ${step}, maxCapacity ${maxCapacity}: ${message}`) }
  const ring: RecordRing = new RecordRing(maxCapacity, maxCapacity, (at) => {
    const sequence = ring.sequence(at)
    const oldest = oldestOf(model)
    if (oldest?.record.sequence !== sequence || ring.find(oldest.key, oldest.hash) !== at) {
      fail(`dropped record ${sequence} at ${at}, the oldest live one is ${oldest?.record.sequence}`)
    } else {
      model.delete(oldest.key)
    }
  })
  // Few hashes, so that records collide in the index, crowding its first and last slots.
  const keys = [...TEXTS, ...range(0, 24).map((index) => `key${index}`), 'ab', 'é€', '扡']
  const hashes = new Map(keys.map((key) => [key, pick(random, [-1, 0, 1, 2, 1023, 1024, 2047, 5, 0x7fffffff, -2048])]))
  const fingerprints = ['', 'f', 'é', '{"a":"€"}', 'x'.repeat(70)]
  const alphabet = ['a', 'b', ' ', 'é', '€', '😀', '\uD800', '\u0000']
  let sequence = 0
  let walking: { cursor: RingCursor, last: number, seen: Set<number> } | undefined

  const expectFound = (entry: RingModelRecord): void => {
    const at = ring.find(entry.key, entry.hash)
    if (at < 0) fail(`${JSON.stringify(entry.key)} (record ${entry.record.sequence}) is not found`)
    const mismatch = ringMismatch(ring, at, entry.record)
    if (mismatch !== undefined) fail(`${JSON.stringify(entry.key)}: ${mismatch}`)
  }
  const body = (): Buffer | string => {
    const length = Math.floor(random() ** 3 * Math.min(maxCapacity, 20_000))
    const kind = random()
    if (kind < 0.4) return 'x'.repeat(length)
    if (kind < 0.6) return Array.from({ length: Math.min(length, 300) }, () => pick(random, alphabet)).join('')
    return Buffer.alloc(length, step & 0xff)
  }

  for (; step < steps; step++) {
    const key = pick(random, keys)
    const hash = hashes.get(key) as number
    const operation = random()
    const existing = model.get(key)
    if (operation < 0.45) {
      if (existing !== undefined && operation >= 0.3) {
        expectFound(existing)
      } else {
        if (existing !== undefined) {
          ring.remove(ring.find(key, hash))
          model.delete(key)
        }
        const record = ringRecord(body(), {
          expiresAt: random() * 1e13,
          sequence: ++sequence,
          size: Math.floor(random() * 2 ** 32),
          headersId: Math.floor(random() * 100),
          statusCode: 100 + Math.floor(random() * 500),
          fingerprint: pick(random, fingerprints)
        })
        const length = recordLength(key, record.fingerprint, record.body)
        const refused = record.bodyBytes > BODY_LIMIT || length > ring.maxCapacity / 2
        const at = ring.add(key, hash, record)
        if ((at < 0) !== refused) fail(`add of a record of ${length} bytes with a body of ${record.bodyBytes} answered ${at}`)
        if (at >= 0) {
          if (at % 8 !== 0 || at + length > ring.maxCapacity) fail(`record of ${length} bytes at ${at} in ${ring.maxCapacity}`)
          model.set(key, { key, hash, record })
          expectFound(model.get(key) as RingModelRecord)
        }
      }
    } else if (operation < 0.75) {
      if (existing === undefined) {
        if (ring.find(key, hash) !== -1) fail(`${JSON.stringify(key)} is found though it holds no record`)
      } else {
        expectFound(existing)
        if (operation < 0.65) {
          ring.remove(ring.find(key, hash))
          model.delete(key)
          if (ring.find(key, hash) !== -1) fail(`${JSON.stringify(key)} is found after its removal`)
        }
      }
    } else if (operation < 0.8) {
      const at = ring.oldest()
      const oldest = oldestOf(model)
      if (oldest === undefined ? at !== -1 : at < 0 || ring.sequence(at) !== oldest.record.sequence || ring.find(oldest.key, oldest.hash) !== at) {
        fail(`oldest() is ${at}, the oldest live record is ${oldest?.record.sequence}`)
      }
    } else if (operation < 0.82) {
      for (const entry of model.values()) expectFound(entry)
    } else {
      if (walking === undefined) {
        if (model.size === 0) continue
        const cursor = ring.cursor()
        walking = { cursor, last: -1, seen: new Set() }
      }
      for (let calls = 1 + Math.floor(random() * 4); calls > 0; calls--) {
        const at = ring.next(walking.cursor)
        if (at < 0) {
          const missed = [...model.values()].filter((entry) => !walking?.seen.has(entry.record.sequence))
          if (missed.length > 0) fail(`a walk ended without visiting records ${missed.map((entry) => entry.record.sequence).join(', ')}`)
          walking = undefined
          break
        }
        const visited = ring.sequence(at)
        const entry = [...model.values()].find((candidate) => candidate.record.sequence === visited)
        if (entry === undefined || ring.find(entry.key, entry.hash) !== at) fail(`a walk visited offset ${at}, which holds no live record`)
        if (visited <= walking.last) fail(`a walk visited record ${visited} after ${walking.last}`)
        walking.last = visited
        walking.seen.add(visited)
      }
    }
    if (ring.count !== model.size) fail(`count ${ring.count}, ${model.size} records live`)
    if (step % 100 === 99) for (const entry of model.values()) expectFound(entry)
  }
  for (const entry of model.values()) expectFound(entry)
}

t.test('a ring agrees with a Map of its records through random adds, removals and walks, with colliding hashes', async (t) => {
  const failures: string[] = []
  for (let seed = 1; seed <= 100 && failures.length < 5; seed++) {
    try {
      fuzzRing(seed, 2000)
    } catch (error) {
      failures.push((error as Error).message)
    }
  }
  t.strictSame(failures, [])
})

interface ModelRecord {
  key: string
  state: RecordState
  fingerprint: string
  owner: string
  expiresAt: number
  leaseExpiresAt: number
  response: StoredResponse | undefined
  /** Bytes the store accounts to it. */
  size: number
  /** Completion order, 0 until completed. */
  sequence: number
  /** Completed into the ring, rather than kept as an object. */
  inRing: boolean
  /** Seen evicted. */
  gone: boolean
}

function headerBytes (headers: StoredResponse['headers']): number {
  let bytes = 0
  for (const name in headers) bytes += name.length + String(headers[name]).length
  return bytes
}

/** What differs between a record the store answered and the one the model holds, or undefined. */
function recordMismatch (found: IdempotencyRecord, expected: ModelRecord, now: number): string | undefined {
  const leaseExpired = expected.state === 'processing' && expected.leaseExpiresAt <= now
  const fields: Array<[string, unknown, unknown]> = [
    ['state', found.state, expected.state],
    ['fingerprint', found.fingerprint, expected.fingerprint],
    ['expiresAt', found.expiresAt, expected.expiresAt],
    ['leaseExpired', found.leaseExpired, leaseExpired]
  ]
  for (const [name, value, stored] of fields) if (!Object.is(value, stored)) return `${name} ${JSON.stringify(value)}, stored ${JSON.stringify(stored)}`
  const response = expected.response
  if (response === undefined) return found.response === undefined ? undefined : 'a response on a record without one'
  if (found.response === undefined) return 'no response'
  if (found.response.statusCode !== response.statusCode) return `status ${found.response.statusCode}, stored ${response.statusCode}`
  if (found.response.headers !== response.headers) return `headers ${JSON.stringify(found.response.headers)}, not the object stored`
  const body = found.response.body
  if (typeof response.body === 'string') {
    return body === response.body ? undefined : `body ${JSON.stringify(body).slice(0, 60)}, stored ${JSON.stringify(response.body).slice(0, 60)}`
  }
  return Buffer.isBuffer(body) && body.equals(response.body) ? undefined : `body of ${body.length} bytes (${typeof body}), stored ${response.body.byteLength} bytes`
}

const SHARED_HEADERS: ReadonlyArray<StoredResponse['headers']> = [
  Object.freeze({}),
  Object.freeze({ 'content-type': 'application/json' }),
  Object.freeze({ 'content-type': 'text/plain; charset=utf-8', 'x-count': 3 }),
  Object.freeze({ 'set-cookie': ['a=1', 'b=2'], 'x-pad': 'p'.repeat(300) })
]

/**
 * Random operations on a small memory store against a model of what it must answer; throws with
 * the seed and step of the first answer the model rules out.
 */
async function fuzzStore (seed: number, steps: number): Promise<void> {
  const random = mulberry32(seed)
  const maxBytes = pick(random, [1024, 2048, 3000, 4096, 8192, 16384, 65536])
  const maxCapacity = maxBytes - (maxBytes % 8)
  const clock = { now: 1_700_000_000_000 }
  const store = new MemoryStore({ maxBytes, now: () => clock.now })
  const keys = [...TEXTS, 'ab', 'é€', '扡', '\uD800\uDC00', ...range(0, pick(random, [0, 16, 60, 250])).map((index) => `key-${index}`)]
  const fingerprints = ['f', 'g', '', 'é', '{"a":"€"}', 'f'.repeat(70)]
  const asciiPool = Array.from({ length: 4096 }, () => String.fromCharCode(32 + Math.floor(random() * 95))).join('')
  const widePool = Array.from({ length: 4096 }, () => pick(random, ['a', 'é', '€', '😀', '\uD800', '\uDC00', 'ÿ', '\u0100', ' '])).join('')
  const bytePool = Buffer.from(Array.from({ length: 8192 }, () => Math.floor(random() * 256)))
  const model = new Map<string, ModelRecord>()
  let sequence = 0
  let step = 0
  const fail = (message: string): never => { throw new Error(`store seed ${seed}, step ${step}, maxBytes ${maxBytes}, now +${clock.now - 1_700_000_000_000}: ${message}`) }
  const live = (record: ModelRecord | undefined): record is ModelRecord => record !== undefined && !record.gone && record.expiresAt > clock.now

  const expectAnswer = (key: string, found: IdempotencyRecord | undefined, record: ModelRecord, what: string): void => {
    if (found === undefined) return
    const mismatch = recordMismatch(found, record, clock.now)
    if (mismatch !== undefined) fail(`${what} ${JSON.stringify(key)}: ${mismatch}`)
  }
  // A completed record that is gone went before every older one: the ring drops its records in
  // the order they came, and eviction takes the oldest of the ring's and the large ones.
  const evicted = (record: ModelRecord): void => {
    record.gone = true
    for (const other of model.values()) {
      if (other.gone || other.state !== 'completed' || other.expiresAt <= clock.now || other.sequence > record.sequence) continue
      if (record.inRing && !other.inRing) continue
      if (store.lookup(other.key) !== undefined) fail(`${JSON.stringify(record.key)} (completed ${record.sequence}) was evicted and the older ${JSON.stringify(other.key)} (completed ${other.sequence}) kept`)
      other.gone = true
    }
  }
  const lookup = (key: string): IdempotencyRecord | undefined => {
    const record = model.get(key)
    const found = store.lookup(key)
    if (!live(record)) {
      if (found !== undefined) fail(`lookup of ${JSON.stringify(key)} found a ${found.state} record where none is live`)
      return found
    }
    if (found === undefined) {
      if (record.state !== 'completed') fail(`a live ${record.state} record under ${JSON.stringify(key)} is lost`)
      evicted(record)
    }
    expectAnswer(key, found, record, 'lookup of')
    return found
  }
  // A store over maxBytes after it grew has evicted every completed record it could.
  const expectNoneCompletedBut = (kept: string | undefined): void => {
    if (store.size <= maxBytes) return
    for (const record of model.values()) {
      if (record.key === kept || !live(record) || record.state !== 'completed') continue
      if (store.lookup(record.key) !== undefined) fail(`size ${store.size} is over maxBytes and ${JSON.stringify(record.key)} (completed) is kept`)
      record.gone = true
    }
  }
  const expectSize = (exact: boolean): void => {
    let present = 0
    let maybe = 0
    for (const record of model.values()) {
      if (lookup(record.key) !== undefined) present += record.size
      else if (!record.gone && record.expiresAt <= clock.now) maybe += record.size
    }
    if (exact ? store.size !== present : store.size < present || store.size > present + maybe) {
      fail(`size ${store.size}, the records present take ${present}${exact ? '' : ` and expired ones up to ${maybe} more`}`)
    }
  }
  const body = (): Buffer | string => {
    const kind = random()
    const length = Math.floor(random() ** 2 * Math.min(random() < 0.8 ? maxBytes / 3 : maxBytes, 2400))
    const start = Math.floor(random() * 1024)
    if (kind < 0.3) return asciiPool.slice(start, start + length)
    if (kind < 0.5) return widePool.slice(start, start + length / 2)
    if (kind < 0.65) return Buffer.from(bytePool.subarray(start, start + length))
    if (kind < 0.75) return bytePool.subarray(start, start + length)
    if (kind < 0.97) return Buffer.alloc(length)
    const large = BODY_LIMIT + 1 + Math.floor(random() * 4000)
    if (kind < 0.98) return `${step}:`.padEnd(large, 'L')
    if (kind < 0.99) return 'é'.repeat(large / 2)
    return Buffer.alloc(large, step & 0xff)
  }
  const ownerOf = (record: ModelRecord | undefined): string => record === undefined ? 'nobody' : random() < 0.9 ? record.owner : 'intruder'
  const updatable = (record: ModelRecord | undefined, owner: string): record is ModelRecord =>
    record !== undefined && !record.gone && record.state === 'processing' && record.owner === owner && record.expiresAt > clock.now

  for (; step < steps; step++) {
    const operation = random()
    // Updates mostly go to running records, as a request's do.
    const running = operation >= 0.2 && operation < 0.66 && random() < 0.85 ? [...model.values()].filter((candidate) => candidate.state === 'processing') : []
    const key = running.length > 0 ? pick(random, running).key : pick(random, keys)
    const record = model.get(key)
    if (operation < 0.2) {
      const fingerprint = pick(random, fingerprints)
      const owner = `owner-${step}`
      const expiresAt = clock.now + (random() < 0.02 ? 0 : 1 + Math.floor(random() * 4000))
      const takeOverExpiredLease = random() < 0.5
      const lease = 1 + Math.floor(random() * 3000)
      const result = store.insert(key, { fingerprint, owner, expiresAt, lease, takeOverExpiredLease })
      if (live(record)) {
        const takeOver = record.state === 'processing' && record.leaseExpiresAt <= clock.now && takeOverExpiredLease && record.fingerprint === fingerprint
        if (result.inserted) {
          if (record.state === 'completed') evicted(record)
          else if (!takeOver) fail(`insert took ${JSON.stringify(key)} from a live ${record.state} record`)
        } else {
          if (takeOver) fail(`insert did not take over ${JSON.stringify(key)}, whose lease expired`)
          expectAnswer(key, result.record, record, 'insert over')
        }
      } else if (!result.inserted) {
        fail(`insert of ${JSON.stringify(key)} found a ${result.record.state} record where none is live`)
      }
      if (result.inserted) {
        model.set(key, {
          key,
          state: 'processing',
          fingerprint,
          owner,
          expiresAt,
          leaseExpiresAt: clock.now + lease,
          response: undefined,
          size: ENTRY_OVERHEAD + key.length + fingerprint.length + owner.length,
          sequence: 0,
          inRing: false,
          gone: false
        })
        expectNoneCompletedBut(undefined)
      }
    } else if (operation < 0.45) {
      const owner = ownerOf(record)
      const expected = updatable(record, owner)
      const response: StoredResponse = {
        statusCode: 100 + Math.floor(random() * 500),
        headers: random() < 0.9 ? pick(random, SHARED_HEADERS) : { 'x-step': String(step) },
        body: body()
      }
      const expiresAt = clock.now + (random() < 0.01 ? -1 : 1 + Math.floor(random() * 3000) + (random() < 0.2 ? 0.5 : 0))
      const updated = store.update(key, owner, { state: 'completed', response, expiresAt })
      if (updated !== expected) fail(`update of ${JSON.stringify(key)} to completed answered ${updated}`)
      if (updated && record !== undefined) {
        const bytes = bodyBytes(response.body)
        record.state = 'completed'
        record.owner = ''
        record.expiresAt = expiresAt
        record.response = response
        record.size += headerBytes(response.headers) + bytes
        record.sequence = ++sequence
        record.inRing = bytes <= BODY_LIMIT && recordLength(key, record.fingerprint, response.body) <= maxCapacity / 2
        if (expiresAt > clock.now && store.lookup(key) === undefined) fail(`the response just stored under ${JSON.stringify(key)} is lost`)
        lookup(key)
        expectNoneCompletedBut(key)
      }
    } else if (operation < 0.53) {
      const owner = ownerOf(record)
      const expiresAt = clock.now + 1 + Math.floor(random() * 5000)
      const updated = store.update(key, owner, { state: 'halted', expiresAt })
      if (updated !== updatable(record, owner)) fail(`update of ${JSON.stringify(key)} to halted answered ${updated}`)
      if (updated && record !== undefined) {
        record.state = 'halted'
        record.owner = ''
        record.expiresAt = expiresAt
      }
    } else if (operation < 0.61) {
      const owner = ownerOf(record)
      const lease = 1 + Math.floor(random() * 3000)
      const updated = store.update(key, owner, { state: 'processing', lease })
      if (updated !== updatable(record, owner)) fail(`renewal of ${JSON.stringify(key)} answered ${updated}`)
      if (updated && record !== undefined) {
        record.leaseExpiresAt = clock.now + lease
        record.expiresAt = Math.max(record.expiresAt, record.leaseExpiresAt)
      }
    } else if (operation < 0.66) {
      const owner = ownerOf(record)
      const deleted = store.delete(key, owner)
      if (deleted !== updatable(record, owner)) fail(`delete of ${JSON.stringify(key)} answered ${deleted}`)
      if (deleted) model.delete(key)
    } else if (operation < 0.86) {
      lookup(key)
    } else if (operation < 0.94) {
      const expiries = [...model.values()].filter(live).map((candidate) => candidate.expiresAt)
      // Now and then exactly onto an expiry, where a record is first absent.
      clock.now = random() < 0.2 && expiries.length > 0 ? Math.ceil(pick(random, expiries)) : clock.now + Math.floor(random() * 400)
    } else if (operation < 0.97) {
      const expired = [...model.values()].filter((candidate) => !candidate.gone && candidate.expiresAt <= clock.now)
      const removed = await store.prune()
      if (removed > expired.length) fail(`prune removed ${removed}, at most ${expired.length} records had expired`)
      for (const candidate of expired) model.delete(candidate.key)
      expectSize(true)
    } else {
      expectSize(false)
    }
  }
  clock.now += 24 * 3_600_000
  await store.prune()
  if (store.size !== 0) fail(`size ${store.size} once every record expired and was pruned`)
  for (const key of keys) if (store.lookup(key) !== undefined) fail(`${JSON.stringify(key)} found once every record expired`)
}

t.test('a small memory store never answers a record other than the last one stored, loses only completed records to eviction, and counts its bytes', async (t) => {
  const failures: string[] = []
  for (let seed = 1; seed <= 200 && failures.length < 5; seed++) {
    try {
      await fuzzStore(seed, 1500)
    } catch (error) {
      failures.push((error as Error).message)
    }
  }
  t.strictSame(failures, [])
})

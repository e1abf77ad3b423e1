import { hash } from 'node:crypto'
import { Readable } from 'node:stream'
import t from 'tap'
import { digest, requestFingerprint } from '../lib/fingerprint.js'

const sha256 = (text: string) => hash('sha256', text, 'base64url')

// The canonical text of a parsed JSON value, written the plainest way: keys sorted, everything
// else as JSON writes it.
function canonical (value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`
  if (value !== null && typeof value === 'object') {
    const record = value as Record<string, unknown>
    return `{${Object.keys(record).sort().map((name) => `${JSON.stringify(name)}:${canonical(record[name])}`).join(',')}}`
  }
  return JSON.stringify(value)
}

const equalPairs: Array<[string, unknown, unknown]> = [
  ['reordered keys', { a: 1, b: { c: [1, 2], d: null, e: true } }, { b: { e: true, d: null, c: [1, 2] }, a: 1 }],
  ['integer-like keys', { 9: 'x', 10: 'y' }, { 10: 'y', 9: 'x' }],
  ['a null-prototype object', Object.assign(Object.create(null), { b: 2, a: 1 }), { a: 1, b: 2 }],
  ['undefined members', { a: 1, b: undefined }, { a: 1 }],
  ['a Date and what its toJSON writes', { at: new Date(0) }, { at: '1970-01-01T00:00:00.000Z' }],
  ['strings to escape', { 'q"': 'line\nbreak', é: '€' }, { é: '€', 'q"': 'line\nbreak' }],
  ['a large body', { items: Array.from({ length: 600 }, (_, index) => ({ id: index, name: `item ${index}` })), a: 0 },
    { a: 0, items: Array.from({ length: 600 }, (_, index) => ({ name: `item ${index}`, id: index })) }],
  ['Maps of equal entries', new Map<unknown, unknown>([['a', 1], [{ k: 1 }, [2]]]), new Map<unknown, unknown>([['a', 1], [{ k: 1 }, [2]]])],
  ['equal bytes', Buffer.from('bytes'), Buffer.from('bytes')],
  ['equal cycles', cyclic(1), cyclic(1)]
]

for (const [name, first, second] of equalPairs) {
  t.test(`equal payloads get one fingerprint: ${name}`, async (t) => {
    t.equal(digest(first), digest(second))
    t.equal(requestFingerprint('application/json', {}, first), requestFingerprint('application/json', {}, second))
  })
}

const differentPairs: Array<[string, unknown, unknown]> = [
  ['array order', { a: [1, 2] }, { a: [2, 1] }],
  ['a number and a string', { a: 1 }, { a: '1' }],
  ['undefined and null in an array', [undefined], [null]],
  ['NaN and null', { a: Number.NaN }, { a: null }],
  ['a Buffer and its JSON', { a: Buffer.from('x') }, { a: { type: 'Buffer', data: [120] } }],
  ['a Buffer and a string of its bytes', Buffer.from('ab'), 'ab'],
  ['a bigint and a number', { a: 1n }, { a: 1 }],
  ['a function and no value', [() => 1], [null]],
  ['a lone surrogate and the replacement character', '\ud800', '\ufffd'],
  ['two lone surrogates', { s: '\ud800' }, { s: '\udc00' }],
  ['Maps of different entries', new Map([['a', 1]]), new Map([['a', 2]])],
  ['a Map and an empty object', new Map([['a', 1]]), {}],
  ['Sets of different values', new Set([1]), new Set([2])],
  ['a Set and an array', new Set([1]), [1]],
  ['a Map and the array of its entries', new Map([['a', 1]]), [['a', 1]]],
  ['typed arrays of different bytes', new Uint8Array([1, 2]), new Uint8Array([1, 3])],
  ['typed arrays of different kinds', new Uint16Array([1]), new Int16Array([1])],
  ['ArrayBuffers of different bytes', new Uint8Array([1]).buffer, new Uint8Array([2]).buffer],
  ['a Date and another', new Date(0), new Date(1)],
  ['regular expressions', /a/g, /a/i],
  ['cycles of different members', cyclic(1), cyclic(2)],
  ['a cycle and its first turn', cyclic(1), { n: 1, self: { n: 1 } }],
  ['a reference to the root and to a member', sharing('root'), sharing('member')]
]

for (const [name, first, second] of differentPairs) {
  t.test(`different payloads get different fingerprints: ${name}`, async (t) => {
    t.not(digest(first), digest(second))
    t.not(requestFingerprint('application/json', {}, first), requestFingerprint('application/json', {}, second))
  })
}

function cyclic (n: number): Record<string, unknown> {
  const value: Record<string, unknown> = { n }
  value.self = value
  return value
}

function sharing (target: 'root' | 'member'): Record<string, unknown> {
  const member = { m: 1 }
  const root: Record<string, unknown> = { a: member }
  root.b = target === 'root' ? root : member
  return root
}

t.test('the fingerprint of any parsed JSON value is the digest of its canonical text', async (t) => {
  let seed = 7
  const random = (): number => { seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648; return seed / 2_147_483_648 }
  const texts = ['', 'a', 'plain text', 'q"uote', 'back\\slash', 'tab\tand\u0001', 'é€', '\ud83d\ude00', '\ud800', '\udfff', '\ue000', '9', '10', '__proto__']
  const pick = <Item>(items: Item[]): Item => items[Math.floor(random() * items.length)] as Item
  const numbers = [0, -0, 1, -1, 0.1, 1e21, 1e-7, 123456789.125, Number.MAX_SAFE_INTEGER, 5e-324]
  function value (depth: number): unknown {
    const kind = Math.floor(random() * (depth > 3 ? 4 : 7))
    if (kind === 0) return pick(texts) + (random() < 0.2 ? 'x'.repeat(Math.floor(random() * 400)) : '')
    if (kind === 1) return pick(numbers)
    if (kind === 2) return random() < 0.5
    if (kind === 3) return null
    if (kind === 4) return Array.from({ length: Math.floor(random() * 5) }, () => value(depth + 1))
    const record: Record<string, unknown> = {}
    for (let index = Math.floor(random() * 6); index > 0; index--) record[pick(texts) + (random() < 0.3 ? String(index) : '')] = value(depth + 1)
    return record
  }
  for (let round = 0; round < 2000; round++) {
    const body = JSON.parse(JSON.stringify({ v: value(0) })) as unknown
    t.equal(digest(body), sha256(canonical(body)), `round ${round}`)
  }
  const huge = { text: 'y'.repeat(100_000), list: [1, 2, 3] }
  t.equal(digest(huge), sha256(`{"list":[1,2,3],"text":"${'y'.repeat(100_000)}"}`), 'a huge value is hashed in chunks to the same digest')
})

t.test('no nesting is too deep: 500 000 levels of arrays or objects get a digest of their own', async (t) => {
  const depth = 500_000
  const arrays = JSON.parse('['.repeat(depth) + ']'.repeat(depth)) as unknown
  const objects = JSON.parse('{"a":'.repeat(depth) + 'null' + '}'.repeat(depth)) as unknown
  const shallower = JSON.parse('['.repeat(depth - 1) + ']'.repeat(depth - 1)) as unknown
  t.equal(digest(arrays), sha256('['.repeat(depth) + ']'.repeat(depth)))
  t.equal(digest(objects), sha256('{"a":'.repeat(depth) + 'null' + '}'.repeat(depth)))
  t.not(digest(arrays), digest(shallower))
})

t.test('what JSON would write through toJSON counts, enumerable or not; members inherited from a polluted Object.prototype do not', async (t) => {
  const withToJSON = (result: unknown, members: object = { a: 1 }) => Object.defineProperty(members, 'toJSON', { value: () => result, enumerable: false })
  t.not(digest(withToJSON({ x: 1 })), digest(withToJSON({ x: 2 })))
  t.equal(digest(withToJSON({ x: 1 })), digest(withToJSON({ x: 1 }, { b: 2 })), 'only what toJSON writes counts')
  t.not(digest({ v: withToJSON({ x: 1 }) }), digest({ v: withToJSON({ x: 2 }) }), 'nested too')
  const prototype = Object.prototype as Record<string, unknown>
  prototype.polluted = 'yes'
  try {
    t.equal(digest({ a: 1, b: 2 }), sha256('{"a":1,"b":2}'))
  } finally {
    delete prototype.polluted
  }
})

t.test('a stream counts as a mark: its bytes are not in the value', async (t) => {
  t.equal(digest({ file: Readable.from(['a']) }), digest({ file: Readable.from(['b']) }))
  t.not(digest({ file: Readable.from(['a']) }), digest({ file: null }))
})

t.test('a request fingerprint is its media type, its query and its body', async (t) => {
  t.equal(requestFingerprint('application/json', {}, { b: 2, a: 1 }), sha256('["application/json",{},{"a":1,"b":2}]'))
  t.not(requestFingerprint('application/json', {}, 'abc'), requestFingerprint('text/plain', {}, 'abc'), 'JSON "abc" is not text abc')
  t.equal(requestFingerprint('Application/JSON; charset=utf-8', {}, 'abc'), requestFingerprint('application/json', {}, 'abc'), 'parameters and case do not count')
  t.equal(requestFingerprint('multipart/form-data; boundary=one', {}, { a: '1' }), requestFingerprint('multipart/form-data; boundary=two', {}, { a: '1' }),
    'a multipart boundary, new on each attempt, does not count')
  t.equal(requestFingerprint(undefined, {}, undefined), sha256('["",{},~]'), 'no body')
  class Query {}
  t.equal(requestFingerprint(undefined, new Query(), { a: 1 }), requestFingerprint(undefined, {}, { a: 1 }), 'an empty query object of any class')
  t.equal(requestFingerprint(undefined, { a: undefined }, { b: 1 }), requestFingerprint(undefined, {}, { b: 1 }), 'a query of undefined members is empty')
  t.not(requestFingerprint(undefined, { dry: 'true' }, { a: 1 }), requestFingerprint(undefined, {}, { a: 1 }), 'the query counts')
  t.not(requestFingerprint(undefined, null, { a: 1 }), requestFingerprint(undefined, {}, { a: 1 }), 'a null query is not an empty one')
  t.not(requestFingerprint(undefined, 'a=1', { a: 1 }), requestFingerprint(undefined, { a: '1' }, { a: 1 }), 'a query left as text is not its parsed form')
  t.equal(requestFingerprint(undefined, { b: '2', a: '1' }, {}), requestFingerprint(undefined, { a: '1', b: '2' }, {}))
  t.not(requestFingerprint(undefined, {}, [{ x: '1' }, [1]]), requestFingerprint(undefined, { x: '1' }, [1]), 'a body cannot pose as a query')
})

import { hash } from 'node:crypto'
import t from 'tap'
import { requestFingerprint, storageKey, valueFingerprint } from '../lib/key.js'

const digest = (text: string) => hash('sha256', text, 'base64url')

t.test('a storage key is the SHA-256 digest of scope, method, path and key, or that text for an in-process store', async (t) => {
  const text = '4:user\nPOST\n/orders\nk-1'
  t.equal(storageKey('user', 'POST', '/orders', 'k-1'), digest(text))
  t.equal(storageKey('user', 'POST', '/orders', 'k-1', true), text)
  t.not(storageKey('user\nPOST', '', '/orders', 'k-1', true), storageKey('user', 'POST', '/orders', 'k-1', true),
    'the scope is length-prefixed: it cannot pose as the method')
})

// Canonical equality must not depend on which path computes it: JSON.stringify for parsed
// JSON with sorted keys, the walk for anything else.
const equalPairs: Array<[string, unknown, unknown]> = [
  ['reordered keys', { a: 1, b: { c: [1, 2], d: null, e: true } }, { b: { e: true, d: null, c: [1, 2] }, a: 1 }],
  ['integer-like keys', { 9: 'x', 10: 'y' }, { 10: 'y', 9: 'x' }],
  ['a null-prototype object', Object.assign(Object.create(null), { b: 2, a: 1 }), { a: 1, b: 2 }],
  ['undefined members', { a: 1, b: undefined }, { a: 1 }],
  ['a Date', { at: new Date(0) }, { at: '1970-01-01T00:00:00.000Z' }],
  ['strings to escape', { 'q"': 'line\nbreak', é: '€' }, { é: '€', 'q"': 'line\nbreak' }],
  ['a large body', { items: Array.from({ length: 600 }, (_, index) => ({ id: index, name: `item ${index}` })), a: 0 },
    { a: 0, items: Array.from({ length: 600 }, (_, index) => ({ name: `item ${index}`, id: index })) }]
]

for (const [name, first, second] of equalPairs) {
  t.test(`equal payloads get one fingerprint: ${name}`, async (t) => {
    for (const inProcess of [false, true]) {
      t.equal(requestFingerprint({}, first, inProcess), requestFingerprint({}, second, inProcess), `inProcess ${String(inProcess)}`)
      t.equal(valueFingerprint(first, inProcess), valueFingerprint(second, inProcess), `value, inProcess ${String(inProcess)}`)
    }
  })
}

const differentPairs: Array<[string, unknown, unknown]> = [
  ['array order', { a: [1, 2] }, { a: [2, 1] }],
  ['a number and a string', { a: 1 }, { a: '1' }],
  ['undefined and null in an array', [undefined], [null]],
  ['NaN and null', { a: Number.NaN }, { a: null }],
  ['a Buffer and its JSON', { a: Buffer.from('x') }, { a: { type: 'Buffer', data: [120] } }],
  ['a bigint and a number', { a: 1n }, { a: 1 }],
  ['a function and no value', [() => 1], [null]]
]

for (const [name, first, second] of differentPairs) {
  t.test(`different payloads get different fingerprints: ${name}`, async (t) => {
    for (const inProcess of [false, true]) {
      t.not(requestFingerprint({}, first, inProcess), requestFingerprint({}, second, inProcess), `inProcess ${String(inProcess)}`)
    }
  })
}

// The canonical text, written the plainest way: keys sorted, everything else as JSON writes it.
function canonical (value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`
  if (value !== null && typeof value === 'object') {
    const record = value as Record<string, unknown>
    return `{${Object.keys(record).sort().map((name) => `${JSON.stringify(name)}:${canonical(record[name])}`).join(',')}}`
  }
  return JSON.stringify(value)
}

t.test('the fingerprint of any parsed JSON value is its canonical text, or that text\'s digest, whichever path writes it', async (t) => {
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
  let small = 0
  for (let round = 0; round < 3000; round++) {
    const body = { v: value(0) }
    const text = canonical(body)
    if (text.length <= 256) small++
    t.equal(requestFingerprint({}, body, true), text.length <= 256 ? text : digest(text), `in process, round ${round}`)
    t.equal(requestFingerprint({}, body), digest(text), `outside, round ${round}`)
  }
  t.ok(small > 1000 && small < 2900, `both sizes were drawn (${small} of 3000 small)`)
})

t.test('a value whose canonical text is about 4 096 characters long gets its canonical digest on either side of that size', async (t) => {
  for (let length = 4070; length <= 4092; length++) {
    for (const body of [{ a: 'x'.repeat(length), b: {} }, { a: 'x'.repeat(length), b: [[]] }, { a: 'x'.repeat(length), b: [1, 'y'] }, { a: 'x'.repeat(length), 'é\n': 1 }]) {
      t.equal(requestFingerprint({}, body, true), digest(canonical(body)), `${Object.keys(body).join(',')} with ${length} characters`)
    }
  }
})

t.test('what JSON would write through toJSON counts, enumerable or not; members inherited from a polluted Object.prototype do not', async (t) => {
  const withToJSON = (result: unknown, members: object = { a: 1 }) => Object.defineProperty(members, 'toJSON', { value: () => result, enumerable: false })
  for (const inProcess of [false, true]) {
    t.not(requestFingerprint({}, withToJSON({ x: 1 }), inProcess), requestFingerprint({}, withToJSON({ x: 2 }), inProcess), `inProcess ${String(inProcess)}`)
    t.equal(requestFingerprint({}, withToJSON({ x: 1 }), inProcess), requestFingerprint({}, withToJSON({ x: 1 }, { b: 2 }), inProcess), 'only what toJSON writes counts')
    t.not(valueFingerprint({ v: withToJSON({ x: 1 }) }, inProcess), valueFingerprint({ v: withToJSON({ x: 2 }) }, inProcess), 'nested too')
  }
  const prototype = Object.prototype as Record<string, unknown>
  prototype.polluted = 'yes'
  try {
    for (const inProcess of [false, true]) {
      t.equal(requestFingerprint({}, { a: 1, b: 2 }, inProcess), requestFingerprint({}, { b: 2, a: 1 }, inProcess), `inProcess ${String(inProcess)}`)
    }
    t.equal(requestFingerprint({}, { a: 1, b: 2 }, true), '{"a":1,"b":2}')
  } finally {
    delete prototype.polluted
  }
})

t.test('the query counts: the same body with another query is another request', async (t) => {
  class Query {}
  for (const inProcess of [false, true]) {
    t.equal(requestFingerprint(new Query(), { a: 1 }, inProcess), requestFingerprint({}, { a: 1 }, inProcess), 'an empty query object of any class')
    t.not(requestFingerprint([], { a: 1 }, inProcess), requestFingerprint({}, { a: 1 }, inProcess), 'an array is not an empty object')
    t.not(requestFingerprint(null, { a: 1 }, inProcess), requestFingerprint({}, { a: 1 }, inProcess))
    t.not(requestFingerprint({ dry: 'true' }, { a: 1 }, inProcess), requestFingerprint({}, { a: 1 }, inProcess))
    t.equal(requestFingerprint({ b: '2', a: '1' }, {}, inProcess), requestFingerprint({ a: '1', b: '2' }, {}, inProcess))
  }
})

t.test('a store outside the process gets a digest; an in-process store keeps a small canonical text', async (t) => {
  t.equal(requestFingerprint({}, { b: 2, a: 1 }), digest('{"a":1,"b":2}'))
  t.equal(requestFingerprint({}, { b: 2, a: 1 }, true), '{"a":1,"b":2}', 'no query and an object body: the body alone')
  t.equal(requestFingerprint(Object.create(null), {}, true), '{}')
  t.equal(requestFingerprint({ x: '1' }, [1, 'two'], true), '[{"x":"1"},[1,"two"]]', 'a query: the array of both')
  t.equal(requestFingerprint({}, [1, 'two'], true), '[{},[1,"two"]]', 'a body that is not an object: the array of both')
  t.equal(valueFingerprint('abc', true), '["abc"]', 'a text always starts with [ or {, which no digest does')
  const large = { text: 'x'.repeat(300) }
  t.equal(requestFingerprint({}, large, true), digest(JSON.stringify(large)), 'a larger text is hashed even in process')
  const huge = { text: 'y'.repeat(10_000), list: [1, 2, 3] }
  t.equal(requestFingerprint({}, huge), digest(`{"list":[1,2,3],"text":"${'y'.repeat(10_000)}"}`), 'a huge value is hashed in chunks to the same digest')
})

t.test('a body alone never stands for a request with a query, nor an object body for any other', async (t) => {
  const cases: Array<[string, [unknown, unknown], [unknown, unknown]]> = [
    ['a body that spells out a query and a body', [{}, [{ x: '1' }, [1]]], [{ x: '1' }, [1]]],
    ['a Buffer body and an object', [{}, Buffer.from('{}')], [{}, {}]],
    ['an object whose toJSON writes what the array of both would be', [{}, { toJSON: () => [{}, 1] }], [{}, 1]]
  ]
  for (const inProcess of [false, true]) {
    for (const [name, [firstQuery, firstBody], [secondQuery, secondBody]] of cases) {
      t.not(requestFingerprint(firstQuery, firstBody, inProcess), requestFingerprint(secondQuery, secondBody, inProcess), `${name}, inProcess ${String(inProcess)}`)
    }
    t.equal(requestFingerprint({ a: undefined }, { b: 1 }, inProcess), requestFingerprint({}, { b: 1 }, inProcess), 'a query of undefined members is empty')
  }
})

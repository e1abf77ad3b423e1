import { hash } from 'node:crypto'
import t from 'tap'
import { storageKey } from '../lib/key.js'

const sha256 = (text: string) => hash('sha256', text, 'base64url')
const base = { method: 'POST', route: '/orders/:id', params: { id: '42' }, key: 'k-1' }

t.test('a storage key is the SHA-256 digest of method, route, constraints, parameters, scope and key', async (t) => {
  t.equal(storageKey({ ...base, scope: 'user' }), sha256('["POST","/orders/:id",{},{"id":"42"},"user","k-1"]'))
  t.equal(storageKey(base), sha256('["POST","/orders/:id",{},{"id":"42"},~,"k-1"]'), 'no scope')
  t.equal(storageKey({ method: 'POST', route: '/orders', key: 'k' }), storageKey({ method: 'POST', route: '/orders', key: 'k', params: {}, constraints: {} }),
    'no parameters and no constraints are the empty ones a request has')
})

t.test('identities that differ in any part never share a key', async (t) => {
  const identities = [
    base,
    { ...base, method: 'PATCH' },
    { ...base, route: '/orders/:id/' },
    { ...base, params: { id: '43' } },
    { ...base, params: { id: '42', extra: '' } },
    { ...base, constraints: { host: 'a.example.com' } },
    { ...base, constraints: { host: 'b.example.com' } },
    { ...base, constraints: { version: '2.0.0' } },
    { ...base, constraints: { host: /^.*\.example\.com$/ } },
    { ...base, constraints: { tag: Buffer.from('a') } },
    { ...base, constraints: { tag: Buffer.from('b') } },
    { ...base, scope: '' },
    { ...base, scope: 'user' },
    { ...base, scope: 'user","k-1' },
    { ...base, scope: '\ud800' },
    { ...base, scope: '\ufffd' },
    { ...base, scope: '\udc00' },
    { ...base, key: 'k-2' },
    { ...base, route: '/orders/:id",{},{"id":"42"},~,"k-1' },
    { ...base, scope: 'user\nPOST' }
  ]
  const keys = new Set(identities.map((identity) => storageKey(identity)))
  t.equal(keys.size, identities.length)
  for (const key of keys) t.match(key, /^[A-Za-z0-9_-]{43}$/, 'a digest, never client text')
})

t.test('parameters count by their values, not by the order they were given in', async (t) => {
  t.equal(storageKey({ ...base, params: { a: '1', b: '2' } }), storageKey({ ...base, params: { b: '2', a: '1' } }))
})

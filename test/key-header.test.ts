import t from 'tap'
import { buildApp } from './helpers/app.js'
import { FaultyStore } from './helpers/stores.js'

async function orderApp (options = {}) {
  const app = await buildApp(options)
  const seen: Array<string | undefined> = []
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    seen.push(request.idempotencyKey)
    return reply.code(201).send({ order: seen.length })
  })
  return { app, seen }
}

t.test('answers 400 KEY_MISSING before the body is read when the key is required', async (t) => {
  const { app, seen } = await orderApp()
  let parsed = 0
  app.addHook('preParsing', async () => { parsed++ })
  const response = await app.inject({
    method: 'POST',
    url: '/orders',
    headers: { 'content-type': 'application/json' },
    payload: '{"not json'
  })
  t.equal(response.statusCode, 400)
  t.same(response.json(), {
    statusCode: 400,
    code: 'FST_IDEMPOTENCY_KEY_MISSING',
    error: 'Bad Request',
    message: 'The Idempotency-Key header is required for this operation'
  })
  t.equal(parsed, 0, 'the body was never parsed')
  t.same(seen, [], 'the handler did not run')
  await app.close()
})

t.test('runs a request without a key untracked when required is false', async (t) => {
  const { app, seen } = await orderApp({ required: false })
  const first = await app.inject({ method: 'POST', url: '/orders', payload: { a: 1 } })
  const second = await app.inject({ method: 'POST', url: '/orders', payload: { a: 1 } })
  t.equal(first.statusCode, 201)
  t.equal(second.statusCode, 201)
  t.same(second.json(), { order: 2 })
  t.equal(first.headers.expires, undefined, 'no record, no Expires')
  t.same(seen, [undefined, undefined])
  await app.close()
})

t.test('a route can require the key where the plugin does not', async (t) => {
  const app = await buildApp({ required: false })
  app.post('/strict', { config: { idempotency: { required: true } } }, async () => ({ ok: true }))
  const response = await app.inject({ method: 'POST', url: '/strict', payload: {} })
  t.equal(response.statusCode, 400)
  t.equal(response.json().code, 'FST_IDEMPOTENCY_KEY_MISSING')
  await app.close()
})

t.test('rejects invalid keys with 400 KEY_INVALID and does not run the handler', async (t) => {
  const { app, seen } = await orderApp({ maxKeyLength: 8 })
  const invalid = [
    '', // empty
    '123456789', // longer than maxKeyLength
    'a b', // a space is not visible ASCII outside quotes
    'clé', // not ASCII
    '"unterminated', // a quoted string must close
    '"a"b"', // an unescaped quote inside a quoted string
    '"a\\b"', // only \" and \\ are escapes
    '""', // empty once unquoted
    '"123456789"', // too long once unquoted
    '"', // a lone quote
    '"\\"' // an escape that eats the closing quote
  ]
  for (const key of invalid) {
    const response = await app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': key }, payload: {} })
    t.equal(response.statusCode, 400, `key ${JSON.stringify(key)}`)
    t.same(response.json(), {
      statusCode: 400,
      code: 'FST_IDEMPOTENCY_KEY_INVALID',
      error: 'Bad Request',
      message: 'The Idempotency-Key header must hold 1 to 8 visible ASCII characters, bare or as a quoted string'
    }, `key ${JSON.stringify(key)}`)
  }
  t.same(seen, [])
  await app.close()
})

t.test('accepts bare and quoted keys and exposes the unquoted key on the request', async (t) => {
  const { app, seen } = await orderApp({ maxKeyLength: 8 })
  const valid: Array<[string, string]> = [
    ['12345678', '12345678'],
    ['a,b!~', 'a,b!~'],
    ['"a b"', 'a b'],
    ['"q\\"x\\\\"', 'q"x\\'],
    ['"1234567"', '1234567']
  ]
  for (const [header] of valid) {
    const response = await app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': header }, payload: {} })
    t.equal(response.statusCode, 201, `key ${header}`)
  }
  t.same(seen, valid.map(([, key]) => key))
  await app.close()
})

t.test('treats "abc" and abc as the same key', async (t) => {
  const { app, seen } = await orderApp()
  const first = await app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'abc' }, payload: { a: 1 } })
  const second = await app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': '"abc"' }, payload: { a: 1 } })
  t.equal(first.statusCode, 201)
  t.equal(second.statusCode, 201)
  t.equal(second.headers['idempotent-replayed'], 'true')
  t.equal(second.body, first.body)
  t.equal(seen.length, 1)
  await app.close()
})

t.test('uses the configured header name', async (t) => {
  const { app, seen } = await orderApp({ header: 'x-request-key' })
  const missing = await app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'k' }, payload: {} })
  t.equal(missing.statusCode, 400)
  t.equal(missing.json().message, 'The X-Request-Key header is required for this operation')
  const ok = await app.inject({ method: 'POST', url: '/orders', headers: { 'X-Request-Key': 'k' }, payload: {} })
  t.equal(ok.statusCode, 201)
  t.same(seen, ['k'])
  await app.close()
})

t.test('stores a hash of scope, method, path and key, never the client text', async (t) => {
  const store = new FaultyStore()
  const app = await buildApp({ store })
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  const response = await app.inject({ method: 'POST', url: '/orders?x=1', headers: { 'idempotency-key': 'client-text' }, payload: {} })
  t.equal(response.statusCode, 200)
  const keys = store.calls.filter((call) => call.operation === 'insert').map((call) => call.key)
  t.equal(keys.length, 1)
  t.match(keys[0], /^[A-Za-z0-9_-]{43}$/, 'a base64url sha256')
  t.notOk(keys[0]?.includes('client'), 'no client text in the key')
  await app.close()
})

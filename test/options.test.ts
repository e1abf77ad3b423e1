import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import idempotency, {
  InvalidOptionError,
  MemoryStore,
  type IdempotencyOptions,
  type IdempotencyStore,
  type NewRecord,
  type RecordUpdate
} from '../lib/index.js'

const PREFIX = 'Invalid fastify-idempotency option: '
const HEADER_RULE = 'must be a header name in lower case'
const STORE_RULE = 'store must be an IdempotencyStore (an object with insert, lookup, update, delete, prune), \'redis\' or \'postgres\''

/** Asserts that an error is the plugin's option error with exactly this detail. */
function assertOptionError (t: Test, error: unknown, detail: string): void {
  t.ok(error instanceof InvalidOptionError, 'an InvalidOptionError')
  t.ok(error instanceof TypeError, 'a TypeError')
  const { code, message } = (error ?? {}) as { code?: unknown, message?: unknown }
  t.equal(code, 'FST_IDEMPOTENCY_INVALID_OPTION')
  t.equal(message, PREFIX + detail)
}

/** Registers the plugin with `options`; resolves the error that `register` and then `ready` rejected with. */
async function registrationError (t: Test, options: unknown): Promise<unknown> {
  const app = Fastify()
  t.teardown(() => app.close())
  let registerError: unknown
  try {
    await app.register(idempotency, options as IdempotencyOptions)
  } catch (error) {
    registerError = error
  }
  t.ok(registerError !== undefined, 'app.register rejects')
  let readyError: unknown
  try {
    await app.ready()
  } catch (error) {
    readyError = error
  }
  t.equal(readyError, registerError, 'app.ready rejects with the same error')
  return registerError
}

/** Runs a route declaration; returns what it threw. */
function declarationError (declare: () => unknown): unknown {
  try {
    declare()
  } catch (error) {
    return error
  }
  return undefined
}

async function registered (options: IdempotencyOptions): Promise<FastifyInstance> {
  const app = Fastify()
  await app.register(idempotency, options)
  return app
}

class PlainStore implements IdempotencyStore {
  readonly inner = new MemoryStore()
  async insert (key: string, record: NewRecord) { return await this.inner.insert(key, record) }
  async lookup (key: string) { return await this.inner.lookup(key) }
  async update (key: string, owner: string, update: RecordUpdate) { return await this.inner.update(key, owner, update) }
  async delete (key: string, owner: string) { return await this.inner.delete(key, owner) }
  async prune () { return await this.inner.prune() }
}

const invalidPluginOptions: Array<{ behaviour: string, options: unknown, detail: string }> = [
  { behaviour: 'rejects a cacheTtl below 1 ms', options: { cacheTtl: 0 }, detail: 'cacheTtl must be >= 1' },
  { behaviour: 'rejects a fractional prune interval', options: { prune: 1.5 }, detail: 'prune must be integer' },
  { behaviour: 'rejects a processingTtl below 10 ms', options: { processingTtl: 5 }, detail: 'processingTtl must be >= 10' },
  { behaviour: 'rejects an unknown option by name', options: { foo: 1 }, detail: "plugin has unknown option 'foo'" },
  { behaviour: 'rejects two unknown options, naming both', options: { foo: 1, bar: 2 }, detail: "plugin has unknown options 'foo', 'bar'" },
  { behaviour: 'rejects an empty methods list', options: { methods: [] }, detail: 'methods must not have fewer than 1 items' },
  { behaviour: 'rejects a method in lower case', options: { methods: ['post'] }, detail: 'methods[0] must be an HTTP method in upper case' },
  { behaviour: 'rejects a method listed twice', options: { methods: ['POST', 'POST'] }, detail: 'methods must not have duplicate items' },
  { behaviour: 'rejects a header name that is not a token', options: { header: 'Idempotency Key' }, detail: `header ${HEADER_RULE}` },
  { behaviour: 'rejects a header name in upper case', options: { header: 'Idempotency-Key' }, detail: `header ${HEADER_RULE}` },
  { behaviour: 'rejects a maxKeyLength of 0', options: { maxKeyLength: 0 }, detail: 'maxKeyLength must be >= 1' },
  { behaviour: 'rejects a maxKeyLength above 8192', options: { maxKeyLength: 9000 }, detail: 'maxKeyLength must be <= 8192' },
  { behaviour: 'rejects a negative maxResponseSize', options: { maxResponseSize: -1 }, detail: 'maxResponseSize must be >= 0' },
  { behaviour: 'rejects a scope that is not a function', options: { scope: 'x' }, detail: 'scope must be function' },
  { behaviour: 'rejects a store without the store methods', options: { store: {} }, detail: STORE_RULE },
  { behaviour: 'rejects a store that is not an object', options: { store: 'nope' }, detail: STORE_RULE },
  { behaviour: 'rejects an excluded header in upper case', options: { excludeHeaders: ['Set-Cookie'] }, detail: `excludeHeaders[0] ${HEADER_RULE}` },
  { behaviour: 'rejects a problemDetails that is not a boolean', options: { problemDetails: 'yes' }, detail: 'problemDetails must be boolean' },
  { behaviour: 'rejects options given as a string', options: 'nope', detail: 'plugin options must be an object' },
  { behaviour: 'rejects options given as a number', options: 42, detail: 'plugin options must be an object' },
  { behaviour: 'rejects options given as an array', options: [], detail: 'plugin options must be an object' }
]

for (const { behaviour, options, detail } of invalidPluginOptions) {
  t.test(behaviour, async (t) => {
    assertOptionError(t, await registrationError(t, options), detail)
  })
}

t.test('validates the options that a function given as options returns', async (t) => {
  const error = await registrationError(t, () => ({ cacheTtl: 0 }))
  assertOptionError(t, error, 'cacheTtl must be >= 1')
})

t.test("accepts and ignores Fastify's own register options", async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(idempotency, { prefix: '/api', logLevel: 'warn', logSerializers: {} })
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  const response = await app.inject({ method: 'POST', url: '/orders' })
  t.equal(response.statusCode, 400, 'the plugin tracks routes as usual')
  t.equal(response.json().code, 'FST_IDEMPOTENCY_KEY_MISSING')
})

t.test('applies the defaults: a memory store, the Idempotency-Key header, required, a day of cache', async (t) => {
  const app = await registered({})
  t.teardown(() => app.close())
  t.ok(app.idempotency.store instanceof MemoryStore, 'the store is a MemoryStore')
  app.post('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))
  app.patch('/orders', { config: { idempotency: true } }, async () => ({ ok: true }))

  const missing = await app.inject({ method: 'PATCH', url: '/orders' })
  t.equal(missing.statusCode, 400)
  t.same(missing.json(), {
    statusCode: 400,
    code: 'FST_IDEMPOTENCY_KEY_MISSING',
    error: 'Bad Request',
    message: 'The Idempotency-Key header is required for this operation'
  })

  const before = Date.now()
  const created = await app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'k1' } })
  t.equal(created.statusCode, 200)
  t.same(created.json(), { ok: true })
  const expires = Date.parse(String(created.headers.expires))
  t.ok(expires >= before + 86_400_000 - 1000 && expires <= Date.now() + 86_400_000,
    'the record is kept for 24 hours')
})

t.test('registers a valid full set of options and uses them', async (t) => {
  const store = new PlainStore()
  const app = await registered({
    cacheTtl: 60_000,
    prune: 1000,
    processingTtl: 10,
    store,
    header: 'x-request-key',
    methods: ['POST', 'PUT'],
    global: true,
    required: true,
    maxKeyLength: 8192,
    scope: () => 'tenant',
    fingerprint: (request) => request.body,
    maxResponseSize: 0,
    releaseOnError: true,
    excludeHeaders: ['set-cookie', 'x-trace'],
    problemDetails: true
  })
  t.teardown(() => app.close())
  t.equal(app.idempotency.store, store, 'the given store is used')
  app.put('/orders/1', async () => ({ ok: true }))
  const response = await app.inject({ method: 'PUT', url: '/orders/1' })
  t.equal(response.statusCode, 400)
  t.equal(response.headers['content-type'], 'application/problem+json; charset=utf-8')
  t.same(response.json(), {
    type: 'tag:fastify-idempotency,2026:key-missing',
    title: 'Idempotency-Key is missing',
    status: 400,
    detail: 'The X-Request-Key header is required for this operation',
    instance: '/orders/1',
    code: 'FST_IDEMPOTENCY_KEY_MISSING'
  })
})

t.test('rejects an invalid route option when the route is declared, naming the route and the option', async (t) => {
  const app = await registered({})
  t.teardown(() => app.close())
  const error = declarationError(() => app.post('/x', { config: { idempotency: { cacheTtl: 0 } } }, async () => 'ok'))
  assertOptionError(t, error, 'route POST /x: config.idempotency.cacheTtl must be >= 1')
})

t.test('rejects a route idempotency config that is neither a boolean nor an object', async (t) => {
  const app = await registered({})
  t.teardown(() => app.close())
  const error = declarationError(() => app.post('/x', { config: { idempotency: 'yes' as never } }, async () => 'ok'))
  assertOptionError(t, error, 'route POST /x: config.idempotency must be a boolean or an object')
})

t.test('rejects an unknown route option by name', async (t) => {
  const app = await registered({})
  t.teardown(() => app.close())
  const error = declarationError(() => app.post('/x', { config: { idempotency: { bogus: 1 } as never } }, async () => 'ok'))
  assertOptionError(t, error, "route POST /x: config.idempotency has unknown option 'bogus'")
})

t.test('rejects a GET route that opts in, naming the tracked methods', async (t) => {
  const app = await registered({})
  t.teardown(() => app.close())
  const error = declarationError(() => app.get('/x', { config: { idempotency: true } }, async () => 'ok'))
  assertOptionError(t, error, 'route GET /x opts in to idempotency, but none of its methods is in methods (POST, PATCH)')
})

t.test('with global, tracks POST routes and leaves GET routes alone', async (t) => {
  const app = await registered({ global: true })
  t.teardown(() => app.close())
  let reads = 0
  app.get('/x', async () => { reads++; return { read: reads } })
  app.post('/x', async () => ({ created: true }))
  const read = await app.inject({ method: 'GET', url: '/x' })
  t.equal(read.statusCode, 200, 'a GET without a key runs')
  t.same(read.json(), { read: 1 })
  const head = await app.inject({ method: 'HEAD', url: '/x' })
  t.equal(head.statusCode, 200, 'the HEAD route Fastify adds is not tracked either')
  const write = await app.inject({ method: 'POST', url: '/x' })
  t.equal(write.statusCode, 400, 'a POST without a key is refused')
  t.equal(write.json().code, 'FST_IDEMPOTENCY_KEY_MISSING')
})

t.test('config.idempotency false opts a route out of global', async (t) => {
  const app = await registered({ global: true })
  t.teardown(() => app.close())
  let runs = 0
  app.post('/untracked', { config: { idempotency: false } }, async () => ({ run: ++runs }))
  const first = await app.inject({ method: 'POST', url: '/untracked' })
  const second = await app.inject({ method: 'POST', url: '/untracked', headers: { 'idempotency-key': 'k1' } })
  const third = await app.inject({ method: 'POST', url: '/untracked', headers: { 'idempotency-key': 'k1' } })
  t.equal(first.statusCode, 200, 'no key needed')
  t.same(third.json(), { run: 3 }, 'a reused key runs the handler again')
  t.equal(second.headers.expires, undefined, 'no record, no Expires')
  t.equal(third.headers['idempotent-replayed'], undefined, 'nothing is replayed')
})

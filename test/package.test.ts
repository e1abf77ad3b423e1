import { createRequire } from 'node:module'
import t from 'tap'
import Fastify from 'fastify'

// The built package as users load it: by name, through package.json "exports".
// `npm test` builds dist/ first.
t.test('loads with import and with require, the same module either way', async (t) => {
  const esm = await import('fastify-idempotency')
  const cjs = createRequire(import.meta.url)('fastify-idempotency') as typeof esm
  t.equal(typeof esm.default, 'function')
  t.equal(esm.idempotency, esm.default, 'the plugin is the default and a named export')
  t.equal(cjs.default, esm.default, 'require gives the same plugin')
  t.equal(cjs.MemoryStore, esm.MemoryStore)
  t.same(Object.keys(esm).sort(), [
    'AlreadyRegisteredError', 'BodyUnseenError', 'ConflictError', 'HOP_BY_HOP_HEADERS', 'HaltedError', 'InvalidOptionError', 'KeyInvalidError',
    'KeyMissingError', 'KeyMultipleError', 'MemoryStore', 'MismatchError', 'POSTGRES_SCHEMA', 'PluginOptionsSchema', 'PostgresStore',
    'RedisStore', 'RequestTracker', 'RouteOptionsSchema', 'StoreUnavailableError', 'default', 'idempotency', 'postgresSchema'
  ])
})

t.test('the built plugin replays a response end to end', async (t) => {
  const { default: idempotency } = await import('fastify-idempotency')
  const app = Fastify()
  await app.register(idempotency)
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  const send = () => app.inject({ method: 'POST', url: '/orders', headers: { 'idempotency-key': 'k' }, payload: {} })
  t.same((await send()).json(), { runs: 1 })
  t.equal((await send()).headers['idempotent-replayed'], 'true')
  t.equal(runs, 1)
  await app.close()
})

import { readFileSync } from 'node:fs'
import { spawnSync } from 'node:child_process'
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
    'RedisStore', 'RequestTracker', 'RouteOptionsSchema', 'StoreOperationMissingError', 'StoreUnavailableError', 'default', 'idempotency',
    'postgresChannel', 'postgresSchema', 'requestChannel', 'settleChannel', 'storeChannel'
  ])
})

t.test('exports the OpenTelemetry instrumentation as fastify-idempotency/otel, apart from the main entry', async (t) => {
  const otel = await import('fastify-idempotency/otel')
  t.strictSame(Object.keys(otel), ['instrumentIdempotency'])
  const stop = otel.instrumentIdempotency()
  t.equal(typeof stop, 'function')
  stop()
  const main = readFileSync(new URL('../dist/index.js', import.meta.url), 'utf8')
  t.notMatch(main, /otel|opentelemetry/, 'the main entry never loads @opentelemetry/api')
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

t.test('the published tarball holds the built package, its SQL, README and LICENSE, and no source maps that would point at missing sources', async (t) => {
  const packed = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { encoding: 'utf8' })
  t.equal(packed.status, 0, packed.stderr)
  const files = (JSON.parse(packed.stdout) as Array<{ files: Array<{ path: string }> }>)[0]?.files.map((file) => file.path) ?? []
  for (const path of ['package.json', 'README.md', 'LICENSE', 'CHANGELOG.md', 'dist/index.js', 'dist/index.d.ts', 'dist/cli.js', 'sql/idempotency_requests.sql']) {
    t.ok(files.includes(path), `ships ${path}`)
  }
  t.same(files.filter((path) => path.endsWith('.map')), [], 'no source maps')
  t.same(files.filter((path) => !/^(dist\/.*\.(js|d\.ts)|sql\/.*\.sql|package\.json|README\.md|LICENSE|CHANGELOG\.md)$/.test(path)), [], 'nothing else: no sources, tests or benchmarks')
})

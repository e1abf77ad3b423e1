import t from 'tap'
import Fastify from 'fastify'
import idempotency, { AlreadyRegisteredError } from '../lib/index.js'
import { logCollector } from './helpers/logs.js'
import { key } from './helpers/timing.js'

t.test('registering the plugin twice on one path of contexts fails with its own coded error', async (t) => {
  const twice = Fastify()
  await twice.register(idempotency)
  await t.rejects(async () => { await twice.register(idempotency) }, { code: 'FST_IDEMPOTENCY_ALREADY_REGISTERED', message: /already registered in this context or an enclosing one/ })
  await twice.close()

  const nested = Fastify()
  await nested.register(idempotency)
  nested.register(async (child) => { await child.register(idempotency) })
  const error = await nested.ready().then(() => undefined, (error: unknown) => error)
  t.ok(error instanceof AlreadyRegisteredError, 'in a child context of one that has it')
  await nested.close()

  const siblings = Fastify()
  let runs = 0
  for (const prefix of ['/a', '/b']) {
    siblings.register(async (child) => {
      await child.register(idempotency)
      child.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
    }, { prefix })
  }
  await siblings.ready()
  for (const prefix of ['/a', '/b', '/a']) {
    t.equal((await siblings.inject({ method: 'POST', url: `${prefix}/orders`, headers: key('k'), payload: {} })).statusCode, 200, `${prefix}: sibling contexts each have their own`)
  }
  t.equal(runs, 2, 'the second /a request is a replay')
  await siblings.close()
})

t.test('a route that opts in but was declared before the plugin registered is logged once, at its first keyed request', async (t) => {
  const logs = logCollector()
  const app = Fastify({ logger: { level: 'error', stream: logs.stream } })
  let runs = 0
  app.register(idempotency, { methods: ['POST', 'PATCH'] })
  // Declared before the plugin's registration ran: no onRoute hook of it saw these routes.
  app.post('/early', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  app.post('/out', { config: { idempotency: false } }, async () => ({ runs: ++runs }))
  app.get('/read', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  await app.ready()
  for (let attempt = 0; attempt < 2; attempt++) {
    t.equal((await app.inject({ method: 'POST', url: '/early', headers: key('k'), payload: {} })).statusCode, 200, 'it runs, untracked')
  }
  t.equal((await app.inject({ method: 'POST', url: '/early', payload: {} })).statusCode, 200, 'without a key it cannot be told')
  t.equal((await app.inject({ method: 'POST', url: '/out', headers: key('k'), payload: {} })).statusCode, 200)
  t.equal((await app.inject({ method: 'GET', url: '/read', headers: key('k') })).statusCode, 200)
  t.equal(runs, 5, 'every request ran its handler: nothing was tracked')
  const missed = logs.lines.filter((line) => line.msg.includes('declared before fastify-idempotency registered'))
  t.same(missed.map((line) => [line.level, line.route]), [[50, 'POST /early']], 'one error, for the route that opted in, with a tracked method')
  await app.close()
})

t.test('with global, an early route without config is logged too; a tracked route with a hook that answers first is not', async (t) => {
  const logs = logCollector()
  const app = Fastify({ logger: { level: 'error', stream: logs.stream } })
  app.register(idempotency, { global: true })
  app.post('/early', async () => ({}))
  app.after(() => {
    app.post('/limited', { onRequest: async (request, reply) => { await reply.code(429).send({ limited: true }) } }, async () => ({}))
  })
  await app.ready()
  t.equal((await app.inject({ method: 'POST', url: '/early', headers: key('k'), payload: {} })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/limited', headers: key('k'), payload: {} })).statusCode, 429)
  t.same(logs.lines.filter((line) => line.msg.includes('declared before')).map((line) => line.route), ['POST /early'])
  await app.close()
})

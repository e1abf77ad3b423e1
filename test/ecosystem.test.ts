import { request as httpRequest, type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http'
import type { AddressInfo } from 'node:net'
import { Readable } from 'node:stream'
import { brotliDecompressSync, gunzipSync, inflateSync } from 'node:zlib'
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import compress from '@fastify/compress'
import cors from '@fastify/cors'
import rateLimit from '@fastify/rate-limit'
import idempotency from '../lib/index.js'
import { key } from './helpers/timing.js'

interface Answer { status: number, headers: IncomingHttpHeaders, body: Buffer }

// A JSON document of a few KB: above @fastify/compress's default threshold of 1024 bytes.
const DOCUMENT = { items: Array.from({ length: 80 }, (_, id) => ({ id, name: `item ${id}`, note: 'žluťoučký kůň' })) }
const SERIALIZED = JSON.stringify(DOCUMENT)
const ENCODINGS = [undefined, 'identity', 'gzip', 'br', 'deflate'] as const
type Encoding = typeof ENCODINGS[number]

/** Listens on loopback, closes the app when the test ends, and answers the port. */
async function listen (t: Test, app: FastifyInstance): Promise<number> {
  t.teardown(() => app.close())
  await app.listen({ host: '127.0.0.1', port: 0 })
  return (app.server.address() as AddressInfo).port
}

/** A POST over a real socket; the body is read as raw bytes, never decoded. Headers set to `undefined` are not sent. */
async function post (port: number, path: string, headers: Record<string, string | undefined>, body = '{}'): Promise<Answer> {
  const sent: OutgoingHttpHeaders = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }
  for (const [name, value] of Object.entries(headers)) if (value !== undefined) sent[name] = value
  return await new Promise((resolve, reject) => {
    const request = httpRequest({ host: '127.0.0.1', port, path, method: 'POST', headers: sent, agent: false }, (response) => {
      const chunks: Buffer[] = []
      response.on('data', (chunk: Buffer) => chunks.push(chunk))
      response.on('end', () => { resolve({ status: response.statusCode ?? 0, headers: response.headers, body: Buffer.concat(chunks) }) })
      response.on('error', reject)
    })
    request.on('error', reject)
    request.end(body)
  })
}

/** The body as the server produced it, decoded by the response's own content-encoding. */
function decode (answer: Answer): string {
  const coding = answer.headers['content-encoding']
  if (coding === undefined || coding === 'identity') return answer.body.toString()
  if (coding === 'gzip') return gunzipSync(answer.body).toString()
  if (coding === 'br') return brotliDecompressSync(answer.body).toString()
  if (coding === 'deflate') return inflateSync(answer.body).toString()
  throw new Error(`unexpected content-encoding ${coding}`)
}

/** The coding a response must have for a request that sent `accepted`: none for no header or identity. */
const expectedCoding = (accepted: Encoding): string | undefined => accepted === undefined || accepted === 'identity' ? undefined : accepted

const COMPRESS_SETUPS = [
  { name: 'registered globally', plugin: {}, route: {} },
  { name: 'registered with global: false and enabled per route', plugin: { global: false }, route: { compress: { threshold: 512 } } }
]

for (const setup of COMPRESS_SETUPS) {
  t.test(`@fastify/compress ${setup.name}: a replay is compressed for the retry's own Accept-Encoding, whatever the first request accepted`, async (t) => {
    const app = Fastify()
    await app.register(compress, setup.plugin)
    await app.register(idempotency)
    const runs = new Map<string, number>()
    app.post('/tracked', { ...setup.route, config: { idempotency: true } }, async (request) => {
      const client = String(request.headers['idempotency-key'])
      runs.set(client, (runs.get(client) ?? 0) + 1)
      return DOCUMENT
    })
    // The same route untracked: what compress sets for a request that is not a replay.
    app.post('/twin', setup.route, async () => DOCUMENT)
    const port = await listen(t, app)

    for (const first of ENCODINGS) {
      for (const retry of ENCODINGS) {
        const name = `${first ?? 'none'} then ${retry ?? 'none'}`
        const client = name.replaceAll(' ', '-')
        const a = await post(port, '/tracked', { ...key(client), 'accept-encoding': first })
        const b = await post(port, '/tracked', { ...key(client), 'accept-encoding': retry })
        const twin = await post(port, '/twin', { 'accept-encoding': retry })
        t.equal(runs.get(client), 1, `${name}: the handler ran once`)
        t.equal(a.status, 200, `${name}: first status`)
        t.equal(b.status, a.status, `${name}: the retry's status is the first's`)
        t.equal(decode(a), SERIALIZED, `${name}: the first body decodes to the handler's bytes`)
        t.equal(decode(b), SERIALIZED, `${name}: the retry's body decodes, by its own coding, to the handler's bytes`)
        t.equal(a.headers['content-encoding'], expectedCoding(first), `${name}: the first is coded as it accepted`)
        t.equal(b.headers['content-encoding'], expectedCoding(retry), `${name}: the retry is coded as it accepted`)
        t.equal(b.headers['content-encoding'], twin.headers['content-encoding'], `${name}: the same coding as an untracked request`)
        t.equal(b.headers.vary, twin.headers.vary, `${name}: vary as compress sets it`)
        if (b.headers['content-encoding'] !== undefined) t.match(b.headers.vary, /accept-encoding/, `${name}: vary names accept-encoding`)
        if (b.headers['content-length'] !== undefined) t.equal(Number(b.headers['content-length']), b.body.length, `${name}: content-length counts the bytes sent`)
        t.equal(b.headers['content-type'], 'application/json; charset=utf-8', `${name}: the retry's content type`)
        t.equal(a.headers['idempotent-replayed'], undefined, `${name}: the first is no replay`)
        t.equal(b.headers['idempotent-replayed'], 'true', `${name}: the retry is a replay`)
      }
    }
  })
}

t.test('@fastify/compress: a streamed response is stored as the handler streamed it and replayed under another coding', async (t) => {
  const app = Fastify()
  await app.register(compress)
  await app.register(idempotency)
  let runs = 0
  app.post('/stream', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    const half = Math.floor(SERIALIZED.length / 2)
    reply.type('application/json')
    return Readable.from([Buffer.from(SERIALIZED.slice(0, half)), Buffer.from(SERIALIZED.slice(half))])
  })
  const port = await listen(t, app)
  const pairs: Array<[Encoding, Encoding]> = [['gzip', 'br'], ['br', 'deflate'], [undefined, 'gzip'], ['deflate', undefined]]
  for (const [first, retry] of pairs) {
    const name = `${first ?? 'none'} then ${retry ?? 'none'}`
    const before = runs
    const a = await post(port, '/stream', { ...key(name.replaceAll(' ', '-')), 'accept-encoding': first })
    const b = await post(port, '/stream', { ...key(name.replaceAll(' ', '-')), 'accept-encoding': retry })
    t.equal(runs, before + 1, `${name}: the handler ran once`)
    t.equal(b.status, a.status, `${name}: the retry's status is the first's`)
    t.equal(a.headers['content-encoding'], expectedCoding(first), `${name}: the first is coded as it accepted`)
    t.equal(b.headers['content-encoding'], expectedCoding(retry), `${name}: the retry is coded as it accepted`)
    t.equal(decode(a), SERIALIZED, `${name}: the first body`)
    t.equal(decode(b), SERIALIZED, `${name}: the replayed body decodes to the streamed bytes`)
    t.equal(b.headers['content-type'], 'application/json', `${name}: the retry's content type`)
    t.equal(b.headers['idempotent-replayed'], 'true', `${name}: the retry is a replay`)
  }
})

const A = 'https://a.example'
const B = 'https://b.example'
const STAGES = ['onRequest', 'preParsing', 'preValidation', 'preHandler', 'preSerialization'] as const
/** The CORS headers of a response. */
const corsHeaders = (answer: Answer): Record<string, unknown> =>
  Object.fromEntries(Object.entries(answer.headers).filter(([name]) => name.startsWith('access-control-') || name === 'vary'))

for (const stage of STAGES) {
  t.test(`@fastify/cors at ${stage}: a replay from origin B gets ${stage === 'preSerialization' ? 'no CORS headers' : 'B\'s CORS headers'}, never A's`, async (t) => {
    const app = Fastify()
    await app.register(cors, { origin: [A, B], hook: stage, credentials: true, exposedHeaders: ['idempotent-replayed'] })
    await app.register(idempotency)
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => reply.code(201).send({ order: ++runs }))
    app.post('/twin', async (request, reply) => reply.code(201).send({ order: 0 }))
    const port = await listen(t, app)

    const first = await post(port, '/orders', { ...key('k'), origin: A })
    t.equal(first.status, 201)
    t.equal(first.headers['access-control-allow-origin'], A, 'the first request gets its own origin')
    t.equal(first.headers['idempotent-replayed'], undefined)
    const fromB = await post(port, '/orders', { ...key('k'), origin: B })
    const unlisted = await post(port, '/orders', { ...key('k'), origin: 'https://c.example' })
    const twinB = await post(port, '/twin', { origin: B })
    const twinUnlisted = await post(port, '/twin', { origin: 'https://c.example' })
    t.equal(runs, 1, 'the handler ran once')
    for (const [name, retry, twin] of [['from B', fromB, twinB], ['from an unlisted origin', unlisted, twinUnlisted]] as const) {
      t.equal(retry.status, 201, `${name}: the stored status`)
      t.equal(retry.body.toString(), '{"order":1}', `${name}: the stored body`)
      t.equal(retry.headers['idempotent-replayed'], 'true', `${name}: a replay`)
      t.not(retry.headers['access-control-allow-origin'], A, `${name}: never A's origin`)
      if (stage === 'preSerialization') t.same(corsHeaders(retry), {}, `${name}: Fastify serializes nothing for a replay, so no CORS headers`)
      else t.same(corsHeaders(retry), corsHeaders(twin), `${name}: the CORS headers cors sets for this request`)
    }
    t.equal(fromB.headers['access-control-allow-origin'], stage === 'preSerialization' ? undefined : B, 'B gets B\'s origin or none')
    t.equal(unlisted.headers['access-control-allow-origin'], undefined, 'an unlisted origin gets none')
    if (stage !== 'preSerialization') {
      t.equal(fromB.headers['access-control-allow-credentials'], 'true', 'credentials for B')
      t.equal(fromB.headers['access-control-expose-headers'], 'idempotent-replayed', 'exposed headers for B')
    }
  })
}

for (const hook of ['onRequest', 'preHandler'] as const) {
  t.test(`@fastify/rate-limit at ${hook}: each replay carries its own remaining count`, async (t) => {
    const app = Fastify()
    await app.register(rateLimit, { max: 10, timeWindow: '1 minute', hook })
    await app.register(idempotency)
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async () => ({ order: ++runs }))
    t.teardown(() => app.close())
    const answers = []
    for (let i = 0; i < 4; i++) answers.push(await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} }))
    t.equal(runs, 1, 'the handler ran once')
    t.same(answers.map((answer) => answer.headers['x-ratelimit-remaining']), ['9', '8', '7', '6'], 'the count goes down for every retry')
    t.same(answers.map((answer) => answer.headers['x-ratelimit-limit']), ['10', '10', '10', '10'])
    t.same(answers.map((answer) => answer.headers['idempotent-replayed']), [undefined, 'true', 'true', 'true'])
    t.same(answers.map((answer) => answer.body), Array(4).fill('{"order":1}'), 'every retry gets the stored body')
  })

  t.test(`@fastify/rate-limit at ${hook}: a 429 from the limiter is not stored, and the key runs or replays once the limit is lifted`, async (t) => {
    const app = Fastify()
    let lifted = false
    await app.register(rateLimit, { max: 2, timeWindow: '1 minute', hook, allowList: () => lifted })
    await app.register(idempotency)
    let runs = 0
    app.post('/orders', { config: { idempotency: true } }, async () => ({ order: ++runs }))
    t.teardown(() => app.close())
    const send = (client: string) => app.inject({ method: 'POST', url: '/orders', headers: key(client), payload: {} })

    t.same((await send('a')).json(), { order: 1 })
    t.equal((await send('a')).headers['idempotent-replayed'], 'true')
    const limitedReplay = await send('a')
    t.equal(limitedReplay.statusCode, 429, 'the limiter answers before the replay')
    t.equal(limitedReplay.headers['idempotent-replayed'], undefined)
    const limitedNew = await send('b')
    t.equal(limitedNew.statusCode, 429, 'a new key is limited too')
    t.equal(limitedNew.headers.expires, undefined, 'no record was completed for the 429')
    t.equal((await send('b')).statusCode, 429)
    t.equal(runs, 1, 'a limited request never runs the handler')

    lifted = true
    const b = await send('b')
    t.equal(b.statusCode, 200, 'the limited key runs: its 429 was not stored')
    t.same(b.json(), { order: 2 })
    t.equal(b.headers['idempotent-replayed'], undefined)
    const replayB = await send('b')
    t.same(replayB.json(), { order: 2 })
    t.equal(replayB.headers['idempotent-replayed'], 'true')
    const replayA = await send('a')
    t.equal(replayA.statusCode, 200)
    t.same(replayA.json(), { order: 1 }, 'the key stored before the 429 still replays its first response')
    t.equal(replayA.headers['idempotent-replayed'], 'true')
    t.equal(runs, 2)
  })
}

t.test('a replay carries the retry\'s own request id, set by a hook before or after the handler', async (t) => {
  let next = 0
  const app = Fastify({ genReqId: () => `req-${++next}` })
  // Added before the plugin, so this onSend runs before the plugin's: it must still not be stored.
  app.addHook('onSend', async (request, reply, payload) => { reply.header('x-served-by', request.id); return payload })
  await app.register(idempotency)
  app.addHook('onRequest', async (request, reply) => { reply.header('x-request-id', request.id) })
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async (request) => ({ order: ++runs, createdBy: request.id }))
  t.teardown(() => app.close())
  const answers = []
  for (let i = 0; i < 3; i++) answers.push(await app.inject({ method: 'POST', url: '/orders', headers: key('k'), payload: {} }))
  t.equal(runs, 1, 'the handler ran once')
  t.same(answers.map((answer) => answer.headers['x-request-id']), ['req-1', 'req-2', 'req-3'], 'each response has its own request id')
  t.same(answers.map((answer) => answer.headers['x-served-by']), ['req-1', 'req-2', 'req-3'], 'an onSend header is the retry\'s too')
  t.same(answers.map((answer) => answer.json()), Array(3).fill({ order: 1, createdBy: 'req-1' }), 'the body is the stored one')
  t.same(answers.map((answer) => answer.headers['idempotent-replayed']), [undefined, 'true', 'true'])
})

import type { AddressInfo } from 'node:net'
import type { Readable } from 'node:stream'
import t, { type Test } from 'tap'
import type { FastifyInstance, FastifyRequest, FastifyServerOptions } from 'fastify'
import multipart, { type MultipartFile, type MultipartValue } from '@fastify/multipart'
import { buildApp } from './helpers/app.js'
import { key } from './helpers/timing.js'

interface Answer { status: number, body: unknown, replayed: boolean }
type Send = (variant: 'first' | 'other') => Promise<Answer>

const mismatch = {
  statusCode: 422,
  code: 'FST_IDEMPOTENCY_MISMATCH',
  error: 'Unprocessable Entity',
  message: 'This idempotency key was already used with a different request payload'
}
const unseen = {
  statusCode: 415,
  code: 'FST_IDEMPOTENCY_BODY_UNSEEN',
  error: 'Unsupported Media Type',
  message: 'This operation reads its request body after the idempotency check, so a key cannot be used with it'
}

/** An app with the plugin and a tracked POST /r whose handler counts its runs. */
async function countingApp (server: FastifyServerOptions = {}, setup: (app: FastifyInstance) => void = () => {}) {
  const app = await buildApp({}, server)
  setup(app)
  const counter = { runs: 0 }
  app.post('/r', { config: { idempotency: true } }, async () => ({ runs: ++counter.runs }))
  return { app, runs: () => counter.runs }
}

/** Injects a POST /r with the key `k` and answers its status, JSON body and replay header. */
async function inject (app: FastifyInstance, payload: string, contentType: string, headers: Record<string, string> = key('k')): Promise<Answer> {
  const response = await app.inject({ method: 'POST', url: '/r', headers: { 'content-type': contentType, ...headers }, payload })
  return { status: response.statusCode, body: response.json(), replayed: response.headers['idempotent-replayed'] === 'true' }
}

/** The first payload runs the handler, its retry replays, another payload with the same key gets 422. */
async function runsOnceReplaysRefuses (t: Test, send: Send, runs: () => number, body: (run: number) => unknown = (run) => ({ runs: run })) {
  t.strictSame(await send('first'), { status: 200, body: body(1), replayed: false }, 'the first request runs the handler')
  t.strictSame(await send('first'), { status: 200, body: body(1), replayed: true }, 'the retry replays')
  t.strictSame(await send('other'), { status: 422, body: mismatch, replayed: false }, 'another payload with the key gets 422')
  t.equal(runs(), 1, 'the handler ran once')
}

/** Parses the body as `parse` makes it, for a route of its own content type. */
function parserOf (contentType: string, parse: (text: string) => unknown) {
  return (app: FastifyInstance) => {
    app.addContentTypeParser(contentType, { parseAs: 'string' }, (request, text, done) => { done(null, parse(text as string)) })
  }
}

const nested = (depth: number, leaf: string) => `${'{"a":'.repeat(depth)}${leaf}${'}'.repeat(depth)}`

t.test('JSON nested 10 000 levels deep is fingerprinted to its deepest level', async (t) => {
  const { app, runs } = await countingApp()
  const body = nested(10_000, '1')
  t.ok(body.length > 60_000 && body.length < (app.initialConfig.bodyLimit ?? 0), `${body.length} bytes, within the body limit`)
  await runsOnceReplaysRefuses(t, (variant) => inject(app, variant === 'first' ? body : nested(10_000, '2'), 'application/json'), runs)
  await app.close()
})

t.test('JSON arrays nested up to the body limit are tracked', async (t) => {
  const { app, runs } = await countingApp()
  const depth = 520_000
  const body = `${'['.repeat(depth)}${']'.repeat(depth)}`
  const limit = app.initialConfig.bodyLimit ?? 0
  t.ok(body.length > 0.99 * limit && body.length < limit, `${body.length} of ${limit} bytes, just under the body limit`)
  await runsOnceReplaysRefuses(t, (variant) =>
    inject(app, variant === 'first' ? body : `${'['.repeat(depth)}0${']'.repeat(depth)}`, 'application/json'), runs)
  await app.close()
})

t.test('a parsed body that refers to itself answers, replays and is told apart', async (t) => {
  const { app, runs } = await countingApp({}, parserOf('application/x-cycle', (text) => {
    const node: Record<string, unknown> = { name: text }
    node.self = node
    node.list = [node, { back: node }]
    return node
  }))
  await runsOnceReplaysRefuses(t, (variant) => inject(app, variant === 'first' ? 'one' : 'two', 'application/x-cycle'), runs)
  await app.close()
})

t.test('a parsed body of shared references 60 levels deep (2^60 paths) is walked once per object', async (t) => {
  const { app, runs } = await countingApp({}, parserOf('application/x-laughs', (text) => {
    let node: Record<string, unknown> = { leaf: text }
    for (let level = 0; level < 60; level++) node = { left: node, right: node }
    return node
  }))
  await runsOnceReplaysRefuses(t, (variant) => inject(app, variant === 'first' ? 'lol' : 'lul', 'application/x-laughs'), runs)
  await app.close()
})

const parsedKinds: Array<{ name: string, parse: (bytes: Buffer) => unknown, first: string, other: string }> = [
  { name: 'a Buffer', parse: (bytes) => bytes, first: 'abc', other: 'abd' },
  { name: 'a Uint16Array', parse: (bytes) => new Uint16Array(bytes), first: 'abc', other: 'abd' },
  { name: 'a Float64Array', parse: (bytes) => Float64Array.from(bytes), first: 'abc', other: 'abd' },
  { name: 'an ArrayBuffer', parse: (bytes) => new Uint8Array(bytes).buffer, first: 'abc', other: 'abd' },
  { name: 'a Map', parse: (bytes) => new Map(Object.entries(JSON.parse(String(bytes)))), first: '{"a":1}', other: '{"a":2}' },
  { name: 'a Set', parse: (bytes) => new Set(JSON.parse(String(bytes))), first: '[1,2]', other: '[1,3]' },
  { name: 'a Date', parse: (bytes) => new Date(String(bytes)), first: '2024-01-01T00:00:00Z', other: '2024-01-01T00:00:01Z' },
  // 2^53 + 1 and 2^53: the same number once converted to a double.
  { name: 'a BigInt', parse: (bytes) => BigInt(String(bytes)), first: '9007199254740993', other: '9007199254740992' }
]

for (const kind of parsedKinds) {
  t.test(`a body parsed as ${kind.name} replays when equal and is refused when different`, async (t) => {
    const { app, runs } = await countingApp({}, (app) => {
      app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (request, bytes, done) => { done(null, kind.parse(bytes as Buffer)) })
    })
    await runsOnceReplaysRefuses(t, (variant) => inject(app, variant === 'first' ? kind.first : kind.other, 'application/octet-stream'), runs)
    await app.close()
  })
}

const fingerprintKinds: Array<[string, (value: string) => unknown]> = [
  ['a Map', (value) => new Map([['amount', value]])],
  ['a Set', (value) => new Set([value])],
  ['a Buffer', (value) => Buffer.from(value)],
  ['a typed array', (value) => new Uint32Array([Number(value)])],
  ['a Date', (value) => new Date(Number(value))],
  ['a BigInt', (value) => BigInt(value) * 10n ** 30n]
]

for (const [name, make] of fingerprintKinds) {
  t.test(`a route fingerprint returning ${name} tells values apart`, async (t) => {
    const app = await buildApp()
    let runs = 0
    const fingerprint = (request: FastifyRequest) => make(request.headers['x-amount'] as string)
    app.post('/r', { config: { idempotency: { fingerprint } } }, async () => ({ runs: ++runs }))
    await runsOnceReplaysRefuses(t, (variant) => inject(app, '{}', 'application/json', { ...key('k'), 'x-amount': variant === 'first' ? '5' : '6' }), () => runs)
    await app.close()
  })
}

interface Form { note: string, file: string }

/** Posts `form` as multipart/form-data with fetch, which draws a new boundary for every request. */
async function postForm (url: string, form: Form, headers: Record<string, string>): Promise<Answer> {
  const data = new FormData()
  data.append('note', form.note)
  data.append('file', new Blob([form.file], { type: 'application/octet-stream' }), 'report.bin')
  const response = await fetch(url, { method: 'POST', headers, body: data })
  return { status: response.status, body: await response.json(), replayed: response.headers.get('idempotent-replayed') === 'true' }
}

async function listen (app: FastifyInstance): Promise<string> {
  await app.listen({ host: '127.0.0.1', port: 0 })
  return `http://127.0.0.1:${(app.server.address() as AddressInfo).port}/upload`
}

const form: Form = { note: 'hello', file: 'file bytes' }

for (const attachFieldsToBody of [true, 'keyValues'] as const) {
  t.test(`multipart with attachFieldsToBody ${String(attachFieldsToBody)}: same fields replay over a socket, a changed file or field is refused`, async (t) => {
    const app = await buildApp()
    await app.register(multipart, { attachFieldsToBody })
    const contentTypes = new Set<string | undefined>()
    app.addHook('onRequest', async (request) => { contentTypes.add(request.headers['content-type']) })
    let runs = 0
    app.post('/upload', { config: { idempotency: true } }, async (request) => {
      runs++
      if (attachFieldsToBody === 'keyValues') {
        const body = request.body as { note: string, file: Buffer }
        return { runs, note: body.note, file: body.file.toString() }
      }
      const body = request.body as { note: MultipartValue<string>, file: MultipartFile }
      return { runs, note: body.note.value, file: (await body.file.toBuffer()).toString() }
    })
    const url = await listen(app)
    const send = (changed: Partial<Form>) => postForm(url, { ...form, ...changed }, key('upload'))
    t.strictSame(await send({}), { status: 200, body: { runs: 1, ...form }, replayed: false }, 'the first upload runs the handler')
    t.strictSame(await send({}), { status: 200, body: { runs: 1, ...form }, replayed: true }, 'the same fields and file replay')
    t.strictSame(await send({ file: 'file bytez' }), { status: 422, body: mismatch, replayed: false }, 'another file content gets 422')
    t.strictSame(await send({ note: 'hellO' }), { status: 422, body: mismatch, replayed: false }, 'another text field gets 422')
    t.equal(runs, 1, 'the handler ran once')
    t.equal(contentTypes.size, 4, 'every request had a boundary of its own')
    await app.close()
  })
}

t.test('multipart read in the handler is refused with 415 BODY_UNSEEN unless the route has a fingerprint', async (t) => {
  const app = await buildApp()
  await app.register(multipart)
  let runs = 0
  const handler = async (request: FastifyRequest) => {
    runs++
    const file = await request.file()
    return { runs, file: (await (file as MultipartFile).toBuffer()).toString() }
  }
  app.post('/upload', { config: { idempotency: { required: false } } }, handler)
  app.post('/upload/:id', {
    config: { idempotency: { fingerprint: (request: FastifyRequest) => request.headers['x-upload-id'] } }
  }, handler)
  const url = await listen(app)
  t.strictSame(await postForm(url, form, key('unseen')), { status: 415, body: unseen, replayed: false }, 'a keyed upload is refused')
  t.equal(runs, 0, 'the handler never ran')
  t.strictSame(await postForm(url, form, {}), { status: 200, body: { runs: 1, file: form.file }, replayed: false }, 'without a key it runs untracked')
  const upload = (file: string) => postForm(`${url}/1`, { ...form, file }, { ...key('unseen'), 'x-upload-id': 'u-1' })
  t.strictSame(await upload(form.file), { status: 200, body: { runs: 2, file: form.file }, replayed: false }, 'with a route fingerprint it is tracked')
  t.strictSame(await upload('other'), { status: 200, body: { runs: 2, file: form.file }, replayed: true }, 'and a retry replays')
  t.equal(runs, 2)
  await app.close()
})

t.test('a body left as a stream, or read from request.raw, is refused with 415 BODY_UNSEEN', async (t) => {
  const app = await buildApp()
  app.addContentTypeParser('application/x-stream', (request, payload, done) => { done(null, payload) })
  app.addContentTypeParser('application/x-raw', (request, payload, done) => { done(null) })
  let runs = 0
  const read = async (stream: Readable) => {
    runs++
    const chunks: Buffer[] = []
    for await (const chunk of stream) chunks.push(chunk as Buffer)
    return { runs, text: Buffer.concat(chunks).toString() }
  }
  const config = { idempotency: { required: false } }
  app.post('/stream', { config }, async (request) => await read(request.body as Readable))
  app.post('/raw', { config }, async (request) => await read(request.raw))
  for (const [url, contentType] of [['/stream', 'application/x-stream'], ['/raw', 'application/x-raw']]) {
    const send = async (headers: Record<string, string>) => {
      const response = await app.inject({ method: 'POST', url, headers: { 'content-type': contentType as string, ...headers }, payload: 'data' })
      return { status: response.statusCode, body: response.json() }
    }
    const before = runs
    t.strictSame(await send(key('k')), { status: 415, body: unseen }, `${url}: a keyed request is refused`)
    t.equal(runs, before, `${url}: the handler did not run`)
    t.strictSame(await send({}), { status: 200, body: { runs: before + 1, text: 'data' } }, `${url}: without a key the handler reads the body`)
  }
  await app.close()
})

t.test('the media type is part of the fingerprint: JSON "abc" and text/plain abc differ', async (t) => {
  const { app, runs } = await countingApp()
  await runsOnceReplaysRefuses(t, (variant) => variant === 'first' ? inject(app, '"abc"', 'application/json') : inject(app, 'abc', 'text/plain'), runs)
  await app.close()
})

t.test('media type parameters and letter case do not count in the fingerprint', async (t) => {
  const { app, runs } = await countingApp()
  t.strictSame(await inject(app, '{"a":1}', 'application/json; charset=utf-8'), { status: 200, body: { runs: 1 }, replayed: false })
  t.strictSame(await inject(app, '{"a":1}', 'application/json'), { status: 200, body: { runs: 1 }, replayed: true }, 'without charset: a replay')
  t.strictSame(await inject(app, '{"a":1}', 'Application/JSON'), { status: 200, body: { runs: 1 }, replayed: true }, 'in capitals: a replay')
  t.equal(runs(), 1)
  await app.close()
})

t.test('JSON with __proto__ or constructor.prototype is refused by Fastify before tracking, and nothing is stored', async (t) => {
  const { app, runs } = await countingApp()
  // secure-json-parse throws, and Fastify answers its own 400 for any JSON it cannot parse.
  const message = 'Body is not valid JSON but content-type is set to \'application/json\''
  for (const payload of ['{"__proto__":{"admin":true}}', '{"constructor":{"prototype":{"admin":true}}}']) {
    t.strictSame(await inject(app, payload, 'application/json'), {
      status: 400, body: { statusCode: 400, code: 'FST_ERR_CTP_INVALID_JSON_BODY', error: 'Bad Request', message }, replayed: false
    }, payload)
  }
  t.equal(runs(), 0)
  t.strictSame(await inject(app, '{"admin":false}', 'application/json'), { status: 200, body: { runs: 1 }, replayed: false }, 'a valid retry runs the handler')
  await app.close()
})

t.test('with onProtoPoisoning ignore, an own __proto__ member counts in the fingerprint', async (t) => {
  const { app, runs } = await countingApp({ onProtoPoisoning: 'ignore' })
  await runsOnceReplaysRefuses(t, (variant) =>
    inject(app, `{"__proto__":{"admin":${variant === 'first' ? 'true' : 'false'}}}`, 'application/json'), runs)
  await app.close()
})

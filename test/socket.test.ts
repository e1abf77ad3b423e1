import t from 'tap'
import type { AddressInfo } from 'node:net'
import { buildApp } from './helpers/app.js'
import { abandonRequest, rawRequest } from './helpers/http.js'
import { deferred } from './helpers/timing.js'

t.test('answers 400 KEY_MULTIPLE when the key is sent in two header lines', async (t) => {
  const app = await buildApp()
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as AddressInfo
  const body = '{}'
  const head = (lines: string) => `POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n${lines}` +
    `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`
  const twice = await rawRequest(port, head('Idempotency-Key: a\r\nidempotency-key: b\r\n'))
  t.match(twice, /^HTTP\/1\.1 400 /)
  t.match(twice, /"code":"FST_IDEMPOTENCY_KEY_MULTIPLE"/)
  t.match(twice, /"message":"The Idempotency-Key header must be sent once, not in several header lines"/)
  const sameValue = await rawRequest(port, head('Idempotency-Key: a\r\nIdempotency-Key: a\r\n'))
  t.match(sameValue, /^HTTP\/1\.1 400 .*FST_IDEMPOTENCY_KEY_MULTIPLE/s, 'even when both lines agree')
  const once = await rawRequest(port, head('Idempotency-Key: a,b\r\n'))
  t.match(once, /^HTTP\/1\.1 200 /, 'one line with a comma in it is one key')
  t.equal(runs, 1)
  await app.close()
})

t.test('stores the response when the client disconnects first, and the retry gets the replay', async (t) => {
  const app = await buildApp()
  const received = deferred()
  const gate = deferred()
  let runs = 0
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    received.resolve()
    await gate.promise
    return reply.code(201).send({ charged: 100 })
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as AddressInfo
  const request = 'POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' +
    'Idempotency-Key: gone\r\nContent-Length: 2\r\n\r\n{}'
  await abandonRequest(port, request, received.promise)
  await new Promise((resolve) => setTimeout(resolve, 20))
  gate.resolve()
  await new Promise((resolve) => setTimeout(resolve, 50))
  const retry = await rawRequest(port, request.replace('\r\n\r\n', '\r\nConnection: close\r\n\r\n'))
  t.match(retry, /^HTTP\/1\.1 201 /)
  t.match(retry, /idempotent-replayed: true/i)
  t.match(retry, /\{"charged":100\}$/)
  t.equal(runs, 1, 'the handler ran once')
  await app.close()
})

t.test('halts the record of a hijacked reply whose client went away before it ended', async (t) => {
  const app = await buildApp({ releaseOnError: true })
  const written = deferred()
  let runs = 0
  app.post('/raw', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    reply.hijack()
    reply.raw.writeHead(200, { 'content-type': 'text/plain' })
    reply.raw.write('partial')
    written.resolve()
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as AddressInfo
  const request = 'POST /raw HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' +
    'Idempotency-Key: hijacked\r\nContent-Length: 2\r\n\r\n{}'
  await abandonRequest(port, request, written.promise)
  await new Promise((resolve) => setTimeout(resolve, 50))
  const retry = await app.inject({ method: 'POST', url: '/raw', headers: { 'idempotency-key': 'hijacked' }, payload: {} })
  t.equal(retry.statusCode, 500)
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED', 'halted, never released: the handler ran')
  t.equal(runs, 1)
  await app.close()
})

t.test('halts the record of a hijacked reply whose client left before the handler returned', async (t) => {
  const app = await buildApp()
  const received = deferred()
  const gate = deferred()
  let runs = 0
  app.post('/raw', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    reply.hijack()
    received.resolve()
    await gate.promise
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as AddressInfo
  const request = 'POST /raw HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' +
    'Idempotency-Key: left\r\nContent-Length: 2\r\n\r\n{}'
  await abandonRequest(port, request, received.promise)
  await new Promise((resolve) => setTimeout(resolve, 50))
  gate.resolve()
  await new Promise((resolve) => setTimeout(resolve, 20))
  const retry = await app.inject({ method: 'POST', url: '/raw', headers: { 'idempotency-key': 'left' }, payload: {} })
  t.equal(retry.json().code, 'FST_IDEMPOTENCY_HALTED')
  t.equal(runs, 1)
  await app.close()
})

import { fork } from 'node:child_process'
import { once } from 'node:events'
import { request as httpRequest } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { ChildProcess } from 'node:child_process'
import type { Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import type { IdempotencyOptions } from '../../lib/index.js'
import { key, sleep } from './timing.js'

/** Builds an app on the shared store under test; the helper closes it when the test ends. */
export type SharedStoreApp = (t: Test, options?: IdempotencyOptions) => Promise<FastifyInstance>

export interface Answer { status: number, body: string, replayed: boolean }

/** POST /orders with a key over a real socket, to an instance on a loopback port. */
export function post (port: number, idempotencyKey: string, body = '{"amount":100}'): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const request = httpRequest({
      host: '127.0.0.1',
      port,
      method: 'POST',
      path: '/orders',
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...key(idempotencyKey) }
    }, (response) => {
      const chunks: Buffer[] = []
      response.on('data', (chunk: Buffer) => chunks.push(chunk))
      response.on('end', () => {
        resolve({ status: response.statusCode ?? 0, body: Buffer.concat(chunks).toString(), replayed: response.headers['idempotent-replayed'] === 'true' })
      })
    })
    request.on('error', reject)
    request.end(body)
  })
}

/** Three instances on real ports sharing one store; 200 concurrent requests with one key. */
export async function exactlyOnceAcrossInstances (t: Test, build: SharedStoreApp): Promise<void> {
  let runs = 0
  const ports: number[] = []
  const idempotencyKey = `shared-${Date.now()}`
  for (let index = 0; index < 3; index++) {
    const app = await build(t)
    app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
      runs++
      await sleep(150)
      return reply.code(201).header('x-instance', String(index)).send({ id: 'ord_1', instance: index })
    })
    await app.listen({ host: '127.0.0.1', port: 0 })
    ports.push((app.server.address() as AddressInfo).port)
  }
  const body = JSON.stringify({ amount: 100 })
  const responses = await Promise.all(Array.from({ length: 200 }, (_, index) => post(ports[index % 3] as number, idempotencyKey, body)))
  t.equal(runs, 1, 'the handler ran once')
  const created = responses.filter((response) => response.status === 201)
  t.ok(created.length >= 1)
  t.ok(responses.every((response) => response.status === 201 || response.status === 409), 'every other response is a 409 or a replay')
  t.equal(new Set(created.map((response) => response.body)).size, 1, 'all 201s carry the same bytes')
  t.equal(created.filter((response) => !response.replayed).length, 1, 'one original, the rest replays')
  const after = await Promise.all(ports.map((port) => post(port, idempotencyKey, body)))
  t.ok(after.every((response) => response.status === 201 && response.replayed && response.body === created[0]?.body),
    'after completion every instance replays the same response')
  t.equal(runs, 1)
}

// An instance in a child process (test/fixtures/instance.ts) that takes the key and runs its
// handler until it is killed.
async function orphanOwner (t: Test, fixtureArguments: string[], processingTtl: number, idempotencyKey: string): Promise<ChildProcess> {
  const child = fork(new URL('../fixtures/instance.ts', import.meta.url), [...fixtureArguments, String(processingTtl)], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc']
  })
  t.teardown(() => { child.kill('SIGKILL') })
  const [{ port }] = await once(child, 'message') as [{ port: number }]
  const orphan = httpRequest({ host: '127.0.0.1', port, method: 'POST', path: '/orders', headers: { ...key(idempotencyKey), 'content-type': 'application/json' } })
  orphan.on('error', () => {})
  orphan.end('{}')
  await once(child, 'message')
  return child
}

/**
 * An instance in a child process takes the key and is killed with SIGKILL while its handler
 * runs; another instance then sees the record through its lease.
 */
export async function killedInstance (
  t: Test,
  build: SharedStoreApp,
  fixtureArguments: string[],
  releaseOnError: boolean
): Promise<void> {
  const processingTtl = 300
  const idempotencyKey = `crash-${Date.now()}-${String(releaseOnError)}`
  const child = await orphanOwner(t, fixtureArguments, processingTtl, idempotencyKey)
  const survivor = await build(t, { processingTtl, releaseOnError })
  let runs = 0
  survivor.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  const send = () => survivor.inject({ method: 'POST', url: '/orders', headers: key(idempotencyKey), payload: {} })
  await sleep(processingTtl + 100)
  t.equal((await send()).statusCode, 409, 'the child renews its lease while it lives')
  child.kill('SIGKILL')
  await once(child, 'exit')
  t.equal((await send()).statusCode, 409, 'just after the kill the lease is still live')
  await sleep(processingTtl + 100)
  const after = await send()
  if (releaseOnError) {
    t.equal(after.statusCode, 200, 'the lapsed record is taken over')
    t.same(after.json(), { runs: 1 })
  } else {
    t.equal(after.statusCode, 500)
    t.equal(after.json().code, 'FST_IDEMPOTENCY_HALTED')
    t.equal(runs, 0, 'never re-run')
  }
}

/**
 * Duplicates on another instance wait for a request whose instance is then killed with SIGKILL:
 * once its lease lapses they are told it halted, or, with `releaseOnError`, one of them takes it
 * over and runs and the others get its response.
 */
export async function killedWhileWaited (
  t: Test,
  build: SharedStoreApp,
  fixtureArguments: string[],
  releaseOnError: boolean
): Promise<void> {
  const processingTtl = 300
  const idempotencyKey = `crash-waited-${Date.now()}-${String(releaseOnError)}`
  const child = await orphanOwner(t, fixtureArguments, processingTtl, idempotencyKey)
  const survivor = await build(t, { processingTtl, releaseOnError, wait: 10_000 })
  let runs = 0
  survivor.post('/orders', { config: { idempotency: true } }, async () => ({ runs: ++runs }))
  const answers = Promise.all(Array.from({ length: 5 }, async () => await survivor.inject({ method: 'POST', url: '/orders', headers: key(idempotencyKey), payload: {} })))
  while (survivor.idempotency.waiting < 5) await sleep(5)
  // Past a lease: the child renews it while it lives, so the duplicates still wait.
  await sleep(processingTtl + 100)
  t.equal(survivor.idempotency.waiting, 5, 'they wait while the owner lives')
  child.kill('SIGKILL')
  const outcomes = (await answers).map((answer) => `${answer.statusCode} ${answer.body}`)
  if (releaseOnError) {
    t.equal(runs, 1, 'one waiter took the lapsed record over and ran')
    t.strictSame([...new Set(outcomes)], ['200 {"runs":1}'], 'the others got its response')
  } else {
    t.equal(runs, 0, 'never re-run')
    t.strictSame([...new Set(outcomes.map((outcome) => JSON.parse(outcome.slice(4)).code as string))], ['FST_IDEMPOTENCY_HALTED'])
    t.ok(outcomes.every((outcome) => outcome.startsWith('500 ')), 'every waiter is told it halted')
  }
}

import type { Test } from 'tap'
import type { FastifyInstance } from 'fastify'
import { deferred, key, sleep } from './timing.js'

type Response = Awaited<ReturnType<FastifyInstance['inject']>>

/** `POST /orders`, whose first request with a key runs until `finish`, and what a test needs of it. */
export interface BlockingOrders {
  runs: () => number
  started: Promise<void>
  finish: () => void
  send: (clientKey: string) => Promise<Response>
}

export function blockingOrders (app: FastifyInstance): BlockingOrders {
  let runs = 0
  const started = deferred()
  const finish = deferred()
  app.post('/orders', { config: { idempotency: true } }, async (request, reply) => {
    runs++
    started.resolve()
    await finish.promise
    return reply.code(201).send({ id: 'ord_1' })
  })
  const send = async (clientKey: string) => await app.inject({ method: 'POST', url: '/orders', headers: key(clientKey), payload: { amount: 1 } })
  return { runs: () => runs, started: started.promise, finish: finish.resolve, send }
}

/** Until `count` duplicates wait in `app`. */
export async function waiters (app: FastifyInstance, count: number): Promise<void> {
  while (app.idempotency.waiting !== count) await sleep(1)
}

/**
 * A duplicate waits for a running request, then the store's server stops: the duplicate gets 503;
 * once the server is back, a new key runs (after the client has reconnected).
 */
export async function outageWhileWaiting (
  t: Test,
  { app, started, finish, send }: BlockingOrders & { app: FastifyInstance },
  server: { stop: () => Promise<void>, start: () => Promise<void> },
  storeName: string
): Promise<void> {
  const running = send('outage')
  await started
  const duplicate = send('outage')
  await waiters(app, 1)
  await server.stop()
  const answer = await duplicate
  t.equal(answer.statusCode, 503)
  t.equal(answer.json().code, 'FST_IDEMPOTENCY_STORE_UNAVAILABLE')
  finish()
  await running
  await server.start()
  let fresh = await send('after')
  for (let attempt = 0; attempt < 100 && fresh.statusCode === 503; attempt++) {
    await sleep(50)
    fresh = await send('after')
  }
  t.equal(fresh.statusCode, 201, `a new key runs once ${storeName} is back`)
}

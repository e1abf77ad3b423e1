// A payments API whose POST /payments is idempotent: run `npm run example`, then try the curl lines it prints.
import Fastify from 'fastify'
import idempotency from '../dist/index.js'

const port = Number(process.env.PORT ?? 3000)
const app = Fastify({ logger: { level: process.env.LOG_LEVEL ?? 'info' } })

// A stand-in for real authentication: `Authorization: Bearer <user>` names the caller.
app.decorateRequest('user', null)
app.addHook('onRequest', async (request, reply) => {
  const match = /^Bearer (\w+)$/.exec(request.headers.authorization ?? '')
  if (match === null) return reply.code(401).send({ error: 'send Authorization: Bearer <user>' })
  request.user = { id: match[1] }
})

await app.register(idempotency, {
  cacheTtl: 60 * 60 * 1000,
  // A key belongs to its caller: Alice's key never replays Bob's payment.
  scope: (request) => request.user.id
})

let charges = 0
app.post('/payments', {
  config: { idempotency: true },
  schema: {
    body: {
      type: 'object',
      required: ['amount'],
      properties: { amount: { type: 'integer', minimum: 1 }, currency: { type: 'string', default: 'EUR' } }
    }
  }
}, async (request, reply) => {
  // Slow enough to see a 409 from a second terminal.
  await new Promise((resolve) => setTimeout(resolve, Number(process.env.DELAY_MS ?? 3000)))
  charges++
  return reply.code(201).send({ id: `pay_${charges}`, ...request.body, payer: request.user.id })
})

app.get('/charges', async () => ({ charges }))

await app.listen({ host: '127.0.0.1', port })

const base = `http://127.0.0.1:${port}`
const headers = "-H 'content-type: application/json' -H 'authorization: Bearer alice'"
console.log(`
Try it (each command prints the status line and the headers):

  # 1. first request: runs the handler (takes 3 s), 201 with an Expires header
  curl -si ${base}/payments ${headers} -H 'Idempotency-Key: order-42' -d '{"amount":100}'

  # 2. the same request again: the stored 201, with Idempotent-Replayed: true
  curl -si ${base}/payments ${headers} -H 'Idempotency-Key: order-42' -d '{"amount":100}'

  # 3. a new key, twice at once: the second gets 409 Conflict with Retry-After: 1
  curl -si ${base}/payments ${headers} -H 'Idempotency-Key: order-43' -d '{"amount":5}' &
  sleep 0.5; curl -si ${base}/payments ${headers} -H 'Idempotency-Key: order-43' -d '{"amount":5}'

  # 4. the first key with another payload: 422 Unprocessable Entity
  curl -si ${base}/payments ${headers} -H 'Idempotency-Key: order-42' -d '{"amount":999}'

  # 5. the first key from another user: a payment of their own (scope)
  curl -si ${base}/payments -H 'content-type: application/json' -H 'authorization: Bearer bob' -H 'Idempotency-Key: order-42' -d '{"amount":100}'

  # how many charges really ran
  curl -s ${base}/charges -H 'authorization: Bearer alice'
`)

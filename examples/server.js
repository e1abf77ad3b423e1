// A payments API whose POST /payments is idempotent: run `npm run example`, then try the curl lines it prints.
import Fastify from 'fastify'
import idempotency from '../dist/index.js'

const port = Number(process.env.PORT ?? 3000)
const app = Fastify({ logger: { level: process.env.LOG_LEVEL ?? 'info' } })

await app.register(idempotency, {
  cacheTtl: 60 * 60 * 1000,
  // In a real API the key belongs to the caller: scope it to the authenticated user.
  scope: (request) => String(request.headers['x-user-id'] ?? 'anonymous')
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
  return reply.code(201).send({ id: `pay_${charges}`, ...request.body, charged: true })
})

app.get('/charges', async () => ({ charges }))

await app.listen({ host: '127.0.0.1', port })

const base = `http://127.0.0.1:${port}`
const json = "-H 'content-type: application/json'"
console.log(`
Try it (each command prints the status line and the replay header):

  # 1. first request: runs the handler (takes 3 s), 201 with an Expires header
  curl -si ${base}/payments ${json} -H 'Idempotency-Key: order-42' -d '{"amount":100}'

  # 2. the same request again: the stored 201, byte for byte, with Idempotent-Replayed: true
  curl -si ${base}/payments ${json} -H 'Idempotency-Key: order-42' -d '{"amount":100}'

  # 3. a new key, twice at once: the second gets 409 Conflict with Retry-After: 1
  curl -si ${base}/payments ${json} -H 'Idempotency-Key: order-43' -d '{"amount":5}' &
  sleep 0.5; curl -si ${base}/payments ${json} -H 'Idempotency-Key: order-43' -d '{"amount":5}'

  # 4. the first key with another payload: 422 Unprocessable Entity
  curl -si ${base}/payments ${json} -H 'Idempotency-Key: order-42' -d '{"amount":999}'

  # how many charges really ran
  curl -s ${base}/charges
`)

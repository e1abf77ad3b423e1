import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import idempotency, { type IdempotencyOptions } from '../../lib/index.js'

/** A Fastify instance with the plugin registered; the caller declares routes and closes it. */
export async function buildApp (options: IdempotencyOptions = {}, server: FastifyServerOptions = {}): Promise<FastifyInstance> {
  const app = Fastify(server)
  await app.register(idempotency, options)
  return app
}

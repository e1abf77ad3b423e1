#!/usr/bin/env node
// `npx fastify-idempotency sql [table]`: prints the PostgreSQL table for the user's migrations.
import { postgresSchema } from './stores/postgres.js'

const [command, table] = process.argv.slice(2)
if (command === 'sql') {
  process.stdout.write(postgresSchema(table))
} else {
  process.stderr.write('usage: fastify-idempotency sql [table]\n  prints the SQL of the PostgreSQL store\'s table\n')
  process.exitCode = 2
}

import { spawnSync } from 'node:child_process'
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { freePort } from './redis-server.js'

/** A PostgreSQL server for the tests: a private cluster, or the one named by DATABASE_URL. */
export interface PostgresServer {
  readonly connectionString: string
  /** Whether the tests own it (and so may stop and start it). */
  readonly private: boolean
  stop (): Promise<void>
  start (): Promise<void>
  /** Stops it and removes its data folder (a shared server is left alone). */
  destroy (): Promise<void>
}

function binaryFolder (): string | undefined {
  const config = spawnSync('pg_config', ['--bindir'], { encoding: 'utf8' })
  const candidates = config.status === 0 ? [config.stdout.trim()] : []
  if (existsSync('/usr/lib/postgresql')) {
    for (const version of readdirSync('/usr/lib/postgresql').sort().reverse()) candidates.push(`/usr/lib/postgresql/${version}/bin`)
  }
  return candidates.find((folder) => existsSync(join(folder, 'initdb')) && existsSync(join(folder, 'pg_ctl')))
}

/**
 * True when the tests have a PostgreSQL: DATABASE_URL, or initdb and pg_ctl installed.
 * Otherwise, under CI=true that is a failure, elsewhere a loud skip.
 */
export function requirePostgres (t: Test): boolean {
  if (process.env.DATABASE_URL !== undefined || binaryFolder() !== undefined) return true
  const reason = 'PostgreSQL is not installed (Debian: apt-get install postgresql) and DATABASE_URL is not set; the PostgreSQL tests cannot run'
  if (process.env.CI === 'true') {
    t.fail(reason)
  } else {
    process.stderr.write(`\n*** SKIPPED: ${reason} ***\n\n`)
    t.pass(`skipped: ${reason}`)
  }
  return false
}

// initdb and pg_ctl refuse to run as root: as root, they run as the postgres user.
function run (folder: string, command: string, args: string[]): void {
  const binary = join(folder, command)
  const asRoot = process.getuid?.() === 0
  const result = asRoot
    ? spawnSync('runuser', ['-u', 'postgres', '--', binary, ...args], { encoding: 'utf8', timeout: 60_000 })
    : spawnSync(binary, args, { encoding: 'utf8', timeout: 60_000 })
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed:\n${result.stdout}\n${result.stderr}`)
}

/** DATABASE_URL when set; otherwise a new cluster in a temporary folder on a free loopback port. */
export async function startPostgres (options: { private?: boolean } = {}): Promise<PostgresServer> {
  const shared = process.env.DATABASE_URL
  if (shared !== undefined && options.private !== true) {
    return { connectionString: shared, private: false, stop: async () => {}, start: async () => {}, destroy: async () => {} }
  }
  const folder = binaryFolder()
  if (folder === undefined) throw new Error('initdb and pg_ctl are not installed')
  const root = mkdtempSync(join(tmpdir(), 'idempotency-postgres-'))
  const data = join(root, 'data')
  if (process.getuid?.() === 0) chownSync(root, Number(spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).stdout), Number(spawnSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).stdout))
  run(folder, 'initdb', ['-D', data, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8', '--locale=C'])
  const port = await freePort()
  const serverOptions = `-p ${port} -k ${root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off`
  const start = async () => { run(folder, 'pg_ctl', ['-D', data, '-o', serverOptions, '-l', join(root, 'log'), '-w', 'start']) }
  const stop = async () => { run(folder, 'pg_ctl', ['-D', data, '-m', 'fast', '-w', 'stop']) }
  await start()
  let running = true
  const onExit = () => {
    if (running) run(folder, 'pg_ctl', ['-D', data, '-m', 'immediate', 'stop'])
  }
  process.on('exit', onExit)
  return {
    connectionString: `postgresql://postgres@127.0.0.1:${port}/postgres`,
    private: true,
    async stop () {
      await stop()
      running = false
    },
    async start () {
      await start()
      running = true
    },
    async destroy () {
      if (running) await stop()
      running = false
      process.off('exit', onExit)
      rmSync(root, { recursive: true, force: true })
    }
  }
}

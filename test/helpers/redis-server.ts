import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync } from 'node:fs'
import { connect, createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'

/** A private redis-server on a free loopback port, started and stopped by the tests. */
export interface RedisServer {
  readonly host: '127.0.0.1'
  readonly port: number
  readonly url: string
  readonly dir: string
  /** SIGTERM (Redis writes its AOF), then waits for the exit. */
  stop (): Promise<void>
  /** Starts it again on the same port and folder. */
  start (): Promise<void>
}

export interface RedisClusterServers {
  readonly nodes: Array<{ host: string, port: number }>
  stop (): Promise<void>
}

const running = new Set<ChildProcess>()
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL')
})

export function redisServerBinary (): string | undefined {
  const found = spawnSync('sh', ['-c', 'command -v redis-server'], { encoding: 'utf8' })
  return found.status === 0 ? found.stdout.trim() : undefined
}

/**
 * True when redis-server is installed. Otherwise the Redis tests cannot run: under CI=true
 * that is a failure, elsewhere a loud skip.
 */
export function requireRedis (t: Test): boolean {
  if (redisServerBinary() !== undefined) return true
  const reason = 'redis-server is not installed (Debian: apt-get install redis-server); the Redis tests cannot run'
  if (process.env.CI === 'true') {
    t.fail(reason)
  } else {
    process.stderr.write(`\n*** SKIPPED: ${reason} ***\n\n`)
    t.pass(`skipped: ${reason}`)
  }
  return false
}

export async function freePort (): Promise<number> {
  const probe = createServer().listen(0, '127.0.0.1')
  await once(probe, 'listening')
  const address = probe.address()
  probe.close()
  return typeof address === 'object' && address !== null ? address.port : 0
}

async function answersPing (port: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port })
    socket.setTimeout(500, () => { socket.destroy(); resolve(false) })
    socket.on('error', () => { resolve(false) })
    socket.on('data', (data: Buffer) => { socket.destroy(); resolve(data.toString().startsWith('+PONG')) })
    socket.write('PING\r\n')
  })
}

async function launch (port: number, dir: string, extra: string[]): Promise<ChildProcess> {
  const child = spawn('redis-server', [
    '--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--daemonize', 'no', '--logfile', '',
    '--enable-debug-command', 'local', ...extra
  ], { stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  const keep = (chunk: Buffer) => { output = (output + chunk.toString()).slice(-4000) }
  child.stdout?.on('data', keep)
  child.stderr?.on('data', keep)
  running.add(child)
  child.once('exit', () => running.delete(child))
  const deadline = Date.now() + 10_000
  while (!await answersPing(port)) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL')
      throw new Error(`redis-server on port ${port} did not start:\n${output}`)
    }
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
  return child
}

async function terminate (child: ChildProcess | undefined): Promise<void> {
  if (child === undefined || child.exitCode !== null || child.signalCode !== null) return
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  await exited
}

/** `persistence`: an append-only file synced on every write, so a restart keeps every record. */
export async function startRedis (options: { persistence?: boolean } = {}): Promise<RedisServer> {
  const port = await freePort()
  const dir = mkdtempSync(join(tmpdir(), 'idempotency-redis-'))
  const extra = options.persistence === true
    ? ['--appendonly', 'yes', '--appendfsync', 'always', '--save', '']
    : ['--appendonly', 'no', '--save', '']
  let child: ChildProcess | undefined = await launch(port, dir, extra)
  return {
    host: '127.0.0.1',
    port,
    url: `redis://127.0.0.1:${port}`,
    dir,
    async stop () {
      await terminate(child)
      child = undefined
    },
    async start () {
      child ??= await launch(port, dir, extra)
    }
  }
}

/** `masters` cluster nodes with every slot assigned, ready when each says cluster_state:ok. */
export async function startRedisCluster (masters = 3): Promise<RedisClusterServers> {
  const dirs: string[] = []
  const children: ChildProcess[] = []
  const nodes: Array<{ host: string, port: number }> = []
  for (let index = 0; index < masters; index++) {
    const port = await freePort()
    const dir = mkdtempSync(join(tmpdir(), 'idempotency-cluster-'))
    dirs.push(dir)
    children.push(await launch(port, dir, [
      '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '5000',
      '--appendonly', 'no', '--save', ''
    ]))
    nodes.push({ host: '127.0.0.1', port })
  }
  const create = spawnSync('redis-cli', [
    '--cluster', 'create', ...nodes.map((node) => `${node.host}:${node.port}`), '--cluster-replicas', '0', '--cluster-yes'
  ], { encoding: 'utf8', timeout: 30_000 })
  const stop = async () => {
    await Promise.all(children.map(terminate))
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true })
  }
  if (create.status !== 0) {
    await stop()
    throw new Error(`redis-cli --cluster create failed:\n${create.stdout}\n${create.stderr}`)
  }
  const deadline = Date.now() + 20_000
  for (const node of nodes) {
    for (;;) {
      const info = spawnSync('redis-cli', ['-p', String(node.port), 'cluster', 'info'], { encoding: 'utf8' })
      if (info.stdout.includes('cluster_state:ok')) break
      if (Date.now() > deadline) {
        await stop()
        throw new Error(`the cluster did not reach cluster_state:ok:\n${info.stdout}`)
      }
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  return { nodes, stop }
}

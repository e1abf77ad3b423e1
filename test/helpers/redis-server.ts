import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { accessSync, constants, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { once } from 'node:events'
import { connect, createServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import type { Test } from 'tap'

/** A private redis-server on a free loopback port, started and stopped by the tests. */
export interface RedisServer {
  readonly host: '127.0.0.1'
  readonly port: number
  /** `redis://127.0.0.1:PORT` */
  readonly url: string
  /** Its private working folder (the append-only file lives here); removed when the test process exits. */
  readonly dir: string
  /** SIGTERM (Redis writes its append-only file), then waits for the exit. Does nothing when it is not running. */
  stop (): Promise<void>
  /** Starts it again on the same port and folder and waits until it answers PING. Does nothing when it is running. */
  start (): Promise<void>
  /** SIGKILL, then waits for the exit: a crash, with no chance to write anything. */
  kill (): Promise<void>
}

/** Cluster nodes (all masters, every slot assigned) for `new Cluster(nodes)`. */
export interface RedisClusterServers {
  readonly nodes: Array<{ host: string, port: number }>
  /** Stops every node and removes their folders. */
  stop (): Promise<void>
}

/** What `redisCommand` returns: simple strings, integers and bulk strings as strings, nil as null. */
export type RedisReply = string | null | RedisReply[]

const HOST = '127.0.0.1'
const READY_TIMEOUT = 10_000
const EXIT_TIMEOUT = 10_000
const CLUSTER_TIMEOUT = 20_000
const CLUSTER_SLOTS = 16384
const OUTPUT_KEPT = 8000

const servers = new Set<ChildProcess>()
const folders = new Set<string>()

// Children are SIGKILLed on a normal exit, even when a test forgot stop(). A process killed by a
// signal runs no 'exit' handler (tap's timeout sends SIGALRM, then SIGKILL), so a watchdog outside
// the test process does the same when the pipe from the test process closes.
process.on('exit', () => {
  for (const child of servers) child.kill('SIGKILL')
  for (const folder of folders) rmSync(folder, { recursive: true, force: true })
})

const watchdogSource = `
const { existsSync, readFileSync, rmSync } = require('node:fs')
const pids = new Set()
const dirs = new Set()
let pending = ''
// Only a redis-server still running under that pid is killed: pids are reused.
const isRedis = (pid) => {
  try {
    return readFileSync('/proc/' + pid + '/cmdline', 'latin1').includes('redis-server')
  } catch {
    return !existsSync('/proc/self')
  }
}
process.stdin.setEncoding('utf8')
process.stdin.on('data', (chunk) => {
  const lines = (pending + chunk).split('\\n')
  pending = lines.pop()
  for (const line of lines) {
    const [operation, ...rest] = line.split(' ')
    const value = rest.join(' ')
    if (operation === '+pid') pids.add(Number(value))
    else if (operation === '-pid') pids.delete(Number(value))
    else if (operation === '+dir') dirs.add(value)
    else if (operation === '-dir') dirs.delete(value)
  }
})
process.stdin.on('end', async () => {
  const deadline = Date.now() + 5000
  for (const pid of pids) {
    try { if (isRedis(pid)) process.kill(pid, 'SIGKILL') } catch {}
  }
  while ([...pids].some(isRedis) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true })
})
`

let watchdog: ChildProcess | undefined

function tellWatchdog (line: string): void {
  if (watchdog === undefined) {
    // Its own process group, so that a Ctrl-C to the test run does not stop it before it cleans up;
    // a bare environment, so that tap's loaders (NODE_OPTIONS) are not loaded into it.
    watchdog = spawn(process.execPath, ['-e', watchdogSource], {
      detached: true,
      stdio: ['pipe', 'ignore', 'ignore'],
      env: { PATH: process.env.PATH ?? '' }
    })
    watchdog.on('error', () => {})
    watchdog.stdin?.on('error', () => {})
    watchdog.unref()
    ;(watchdog.stdin as Socket | null)?.unref()
  }
  watchdog.stdin?.write(`${line}\n`)
}

function track (folder: string): void {
  folders.add(folder)
  tellWatchdog(`+dir ${folder}`)
}

function removeFolder (folder: string): void {
  rmSync(folder, { recursive: true, force: true })
  folders.delete(folder)
  tellWatchdog(`-dir ${folder}`)
}

let binary: string | null | undefined

/** The path of redis-server on PATH, or undefined when it is not installed. */
export function redisServerBinary (): string | undefined {
  if (binary === undefined) {
    binary = null
    for (const folder of (process.env.PATH ?? '').split(delimiter)) {
      if (folder === '') continue
      const candidate = join(folder, 'redis-server')
      try {
        accessSync(candidate, constants.X_OK)
        binary = candidate
        break
      } catch {}
    }
  }
  return binary ?? undefined
}

function requiredBinary (): string {
  const found = redisServerBinary()
  if (found === undefined) throw new Error('redis-server is not installed (Debian: apt-get install redis-server)')
  return found
}

/** The major version of the installed redis-server, or undefined when it cannot tell. */
function majorVersion (path: string): number | undefined {
  const result = spawnSync(path, ['--version'], { encoding: 'utf8', timeout: 5000 })
  const match = /v=(\d+)\./.exec(result.stdout ?? '')
  return match?.[1] === undefined ? undefined : Number(match[1])
}

/**
 * For the top of a test file: true when redis-server 7 or later is installed. Otherwise the Redis
 * tests cannot run: under CI=true that fails `t`, elsewhere it warns loudly and skips.
 */
export function requireRedis (t: Test): boolean {
  const path = redisServerBinary()
  const version = path === undefined ? undefined : majorVersion(path)
  if (path !== undefined && version !== undefined && version >= 7) return true
  const problem = path === undefined
    ? 'redis-server is not installed'
    : `${path} is version ${version ?? 'unknown'}; the tests need 7 or later (--enable-debug-command, --cluster-port)`
  const reason = `${problem}: install redis-server (Debian: apt-get install redis-server) to run the Redis tests`
  if (process.env.CI === 'true') {
    t.fail(reason)
  } else {
    process.stderr.write(`\n${'*'.repeat(80)}\n*** SKIPPING THE REDIS TESTS: ${reason}\n${'*'.repeat(80)}\n\n`)
    void t.skip(reason, () => {})
  }
  return false
}

/** A port that was free on 127.0.0.1 a moment ago (another process may take it before it is used). */
export async function freePort (): Promise<number> {
  const probe = createServer()
  probe.listen(0, HOST)
  await once(probe, 'listening')
  const address = probe.address()
  probe.close()
  await once(probe, 'close')
  if (typeof address !== 'object' || address === null) throw new Error('could not find a free port')
  return address.port
}

function encodeCommand (args: string[]): string {
  return `*${args.length}\r\n${args.map((arg) => `$${Buffer.byteLength(arg)}\r\n${arg}\r\n`).join('')}`
}

type Parsed = { reply: RedisReply | Error, end: number } | undefined

function parseReply (data: Buffer, start: number): Parsed {
  const lineEnd = data.indexOf('\r\n', start)
  if (lineEnd === -1) return undefined
  const type = data.toString('latin1', start, start + 1)
  const line = data.toString('utf8', start + 1, lineEnd)
  const next = lineEnd + 2
  switch (type) {
    case '+':
    case ':':
      return { reply: line, end: next }
    case '-':
      return { reply: new Error(line), end: next }
    case '$': {
      const length = Number(line)
      if (length < 0) return { reply: null, end: next }
      if (data.length < next + length + 2) return undefined
      return { reply: data.toString('utf8', next, next + length), end: next + length + 2 }
    }
    case '*': {
      const count = Number(line)
      if (count < 0) return { reply: null, end: next }
      const items: RedisReply[] = []
      let offset = next
      for (let index = 0; index < count; index++) {
        const item = parseReply(data, offset)
        if (item === undefined) return undefined
        if (item.reply instanceof Error) return item
        items.push(item.reply)
        offset = item.end
      }
      return { reply: items, end: offset }
    }
    default:
      return { reply: new Error(`unexpected reply: ${JSON.stringify(data.toString('utf8', start, start + 80))}`), end: data.length }
  }
}

/**
 * Sends one command over a fresh connection to 127.0.0.1:port and resolves with the reply; a Redis
 * error reply rejects. For harness checks and test set-up, where a client library is not the point.
 */
export async function redisCommand (port: number, ...args: string[]): Promise<RedisReply> {
  return await new Promise((resolve, reject) => {
    const socket = connect({ host: HOST, port })
    let received = Buffer.alloc(0)
    socket.setTimeout(2000, () => { socket.destroy(new Error(`no reply from ${HOST}:${port} to ${args[0] ?? ''} within 2 s`)) })
    socket.on('error', reject)
    socket.on('close', () => { reject(new Error(`${HOST}:${port} closed the connection before replying to ${args[0] ?? ''}`)) })
    socket.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk])
      const parsed = parseReply(received, 0)
      if (parsed === undefined) return
      if (parsed.reply instanceof Error) reject(parsed.reply)
      else resolve(parsed.reply)
      socket.destroy()
    })
    socket.write(encodeCommand(args))
  })
}

interface Running {
  readonly child: ChildProcess
  readonly exited: Promise<void>
  output (): string
}

function spawnServer (port: number, dir: string, extra: string[]): Running {
  // --logfile '' logs to stdout, which is kept for the error messages.
  return spawnRedis(dir, [
    '--port', String(port), '--bind', HOST, '--protected-mode', 'yes', '--dir', dir,
    '--daemonize', 'no', '--logfile', '', '--save', '',
    // The store tests block the server with DEBUG SLEEP to provoke timeouts.
    '--enable-debug-command', 'local',
    ...extra
  ])
}

function spawnRedis (dir: string, args: string[]): Running {
  const child = spawn(requiredBinary(), args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  const keep = (chunk: Buffer) => {
    output += chunk.toString()
    if (output.length > OUTPUT_KEPT) output = output.slice(output.indexOf('\n', output.length - OUTPUT_KEPT) + 1)
  }
  child.stdout?.on('data', keep)
  child.stderr?.on('data', keep)
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => { resolve() })
    child.once('error', (error) => {
      output += `\n${error.message}\n`
      resolve()
    })
  })
  // Unreferenced, so that a server a test forgot to stop does not keep the test process alive:
  // the process ends, and the 'exit' handler kills the server.
  child.unref()
  ;(child.stdout as Socket | null)?.unref()
  ;(child.stderr as Socket | null)?.unref()
  servers.add(child)
  if (child.pid !== undefined) tellWatchdog(`+pid ${child.pid}`)
  void exited.then(() => {
    servers.delete(child)
    if (child.pid !== undefined) tellWatchdog(`-pid ${child.pid}`)
  })
  return { child, exited, output: () => output }
}

function hasExited (child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null
}

async function endServer (running: Running, signal: 'SIGTERM' | 'SIGKILL'): Promise<void> {
  if (!hasExited(running.child)) running.child.kill(signal)
  // Also keeps the test process alive until the child exits: the child itself is unreferenced.
  const timer = setTimeout(() => running.child.kill('SIGKILL'), EXIT_TIMEOUT)
  await running.exited
  clearTimeout(timer)
}

/** Whether the server answering on `port` is this child, has loaded its data and answers PING. */
async function isReady (port: number, child: ChildProcess): Promise<boolean> {
  try {
    if (await redisCommand(port, 'PING') !== 'PONG') return false
    // Another process may hold the port (it was only free a moment ago): check that it is ours.
    const info = await redisCommand(port, 'INFO')
    return typeof info === 'string' && info.includes(`\r\nprocess_id:${child.pid}\r\n`) && info.includes('\r\nloading:0\r\n')
  } catch {
    return false
  }
}

class StartError extends Error {
  constructor (message: string, readonly portTaken: boolean) {
    super(message)
  }
}

async function launch (port: number, dir: string, extra: string[]): Promise<Running> {
  const running = spawnServer(port, dir, extra)
  const deadline = Date.now() + READY_TIMEOUT
  while (!await isReady(port, running.child)) {
    const exited = hasExited(running.child)
    if (exited || Date.now() > deadline) {
      await endServer(running, 'SIGKILL')
      const what = exited
        ? `exited (${running.child.exitCode !== null ? `code ${running.child.exitCode}` : running.child.signalCode ?? 'spawn failed'}) before answering PING`
        : `did not answer PING within ${READY_TIMEOUT / 1000} s`
      const output = running.output()
      throw new StartError(`redis-server on ${HOST}:${port} (folder ${dir}) ${what}; its last output:\n${output}`, output.includes('Address already in use'))
    }
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return running
}

/** Starts on a fresh free port, trying another one when a different process took it first. */
async function launchOnFreePort (dir: string, extra: (port: number) => Promise<string[]> | string[]): Promise<{ port: number, running: Running }> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    try {
      return { port, running: await launch(port, dir, await extra(port)) }
    } catch (error) {
      if (!(error instanceof StartError && error.portTaken) || attempt === 5) throw error
    }
  }
}

/**
 * Starts a private redis-server on a free 127.0.0.1 port, in a new folder under the system's temporary folder.
 * `persistence`: an append-only file synced on every write, so a restart (even after kill()) keeps every write;
 * otherwise nothing is written to disk.
 */
export async function startRedis (options: { persistence?: boolean } = {}): Promise<RedisServer> {
  const dir = mkdtempSync(join(tmpdir(), 'idempotency-redis-'))
  track(dir)
  const extra = options.persistence === true
    ? ['--appendonly', 'yes', '--appendfsync', 'always']
    : ['--appendonly', 'no']
  let port: number
  let running: Running | undefined
  try {
    ({ port, running } = await launchOnFreePort(dir, () => extra))
  } catch (error) {
    removeFolder(dir)
    throw error
  }
  // One operation at a time, so that concurrent stop() and start() calls cannot interleave.
  let queue: Promise<unknown> = Promise.resolve()
  const serial = async (operation: () => Promise<void>): Promise<void> => {
    const result = queue.then(operation)
    queue = result.catch(() => {})
    await result
  }
  const end = (signal: 'SIGTERM' | 'SIGKILL') => serial(async () => {
    if (running === undefined) return
    await endServer(running, signal)
    running = undefined
  })
  return {
    host: HOST,
    port,
    url: `redis://${HOST}:${port}`,
    dir,
    stop: () => end('SIGTERM'),
    kill: () => end('SIGKILL'),
    start: () => serial(async () => {
      if (running !== undefined && !hasExited(running.child)) return
      running = await launch(port, dir, extra)
    })
  }
}

async function clusterInfo (port: number): Promise<string> {
  try {
    const info = await redisCommand(port, 'CLUSTER', 'INFO')
    return typeof info === 'string' ? info : ''
  } catch (error) {
    return (error as Error).message
  }
}

/**
 * Starts `masters` cluster nodes on free 127.0.0.1 ports, splits the 16384 slots between them, joins them,
 * and waits until every node says cluster_state:ok (Redis holds that back for about 2 s after start).
 */
export async function startRedisCluster (masters = 3): Promise<RedisClusterServers> {
  if (!Number.isInteger(masters) || masters < 1) throw new RangeError(`a cluster needs at least one master, got ${masters}`)
  const members: Array<{ port: number, busPort: number, dir: string, running?: Running }> = []
  const stop = async () => {
    await Promise.all(members.map(async (member) => {
      if (member.running !== undefined) await endServer(member.running, 'SIGTERM')
      removeFolder(member.dir)
    }))
    members.length = 0
  }
  try {
    // Settled, not all: when one node fails to start, the others must be running (and stoppable) first.
    const started = await Promise.allSettled(Array.from({ length: masters }, async () => {
      const member: { port: number, busPort: number, dir: string, running?: Running } = { port: 0, busPort: 0, dir: mkdtempSync(join(tmpdir(), 'idempotency-cluster-')) }
      track(member.dir)
      members.push(member)
      const launched = await launchOnFreePort(member.dir, async () => {
        // The cluster bus listens on its own port, by default port + 10000, which may be taken or above 65535.
        member.busPort = await freePort()
        return [
          '--appendonly', 'no',
          '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '5000',
          '--cluster-port', String(member.busPort)
        ]
      })
      member.port = launched.port
      member.running = launched.running
    }))
    const failed = started.find((result) => result.status === 'rejected')
    if (failed !== undefined) throw failed.reason
    const share = Math.ceil(CLUSTER_SLOTS / masters)
    await Promise.all(members.map(async (member, index) => {
      const first = index * share
      const last = Math.min(CLUSTER_SLOTS, first + share) - 1
      await redisCommand(member.port, 'CLUSTER', 'ADDSLOTSRANGE', String(first), String(last))
      // Distinct epochs, as redis-cli --cluster create sets them, so no epoch collision has to be resolved.
      await redisCommand(member.port, 'CLUSTER', 'SET-CONFIG-EPOCH', String(index + 1))
    }))
    const [first, ...others] = members
    if (first === undefined) throw new Error('no cluster node started')
    for (const other of others) {
      await redisCommand(first.port, 'CLUSTER', 'MEET', HOST, String(other.port), String(other.busPort))
    }
    const deadline = Date.now() + CLUSTER_TIMEOUT
    for (;;) {
      const infos = await Promise.all(members.map((member) => clusterInfo(member.port)))
      if (infos.every((info) => info.includes('cluster_state:ok') && info.includes(`cluster_known_nodes:${masters}\r\n`))) break
      if (Date.now() > deadline) {
        throw new Error(`the cluster did not reach cluster_state:ok within ${CLUSTER_TIMEOUT / 1000} s:\n${
          members.map((member, index) => `--- ${HOST}:${member.port}\n${infos[index] ?? ''}\n${member.running?.output() ?? ''}`).join('\n')
        }`)
      }
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
  } catch (error) {
    await stop()
    throw error
  }
  return {
    nodes: members.map((member) => ({ host: HOST, port: member.port })),
    stop
  }
}

/** A primary, two replicas of it and three Sentinels watching them, on free 127.0.0.1 ports. */
export interface RedisSentinelServers {
  /** The name the Sentinels know the primary by. */
  readonly name: string
  readonly sentinels: Array<{ host: string, port: number }>
  /** The primary and the replicas, in the roles they started in. */
  readonly servers: [SentinelMember, SentinelMember, SentinelMember]
  /** The port of the server the Sentinels name primary now. */
  primary (): Promise<number>
  /** Stops every process and removes their folders. */
  stop (): Promise<void>
}

/** A server watched by the Sentinels: killed with SIGKILL, paused with SIGSTOP and resumed with SIGCONT. */
export interface SentinelMember { port: number, kill: () => Promise<void>, pause: () => void, resume: () => void }

const SENTINEL_TIMEOUT = 30_000

async function until (what: string, check: () => Promise<boolean>, timeout = SENTINEL_TIMEOUT): Promise<void> {
  const deadline = Date.now() + timeout
  while (!await check().catch(() => false)) {
    if (Date.now() > deadline) throw new Error(`${what} within ${timeout / 1000} s`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

/**
 * Starts a primary and two replicas of it (so that a promoted one still has a replica), then three
 * Sentinels that watch them (quorum 2, a server down after 1 s), and waits until each Sentinel
 * knows the replicas and the other two.
 */
export async function startRedisSentinel (): Promise<RedisSentinelServers> {
  const name = 'primary'
  const members: Array<{ port: number, dir: string, running?: Running }> = []
  const stop = async () => {
    await Promise.all(members.map(async (member) => {
      if (member.running !== undefined) {
        member.running.child.kill('SIGCONT')
        await endServer(member.running, 'SIGKILL')
      }
      removeFolder(member.dir)
    }))
    members.length = 0
  }
  const member = () => {
    const entry: { port: number, dir: string, running?: Running } = { port: 0, dir: mkdtempSync(join(tmpdir(), 'idempotency-sentinel-')) }
    track(entry.dir)
    members.push(entry)
    return entry
  }
  const dataServer = async (extra: string[]) => {
    const entry = member()
    const launched = await launchOnFreePort(entry.dir, () => ['--appendonly', 'no', ...extra])
    entry.port = launched.port
    entry.running = launched.running
    return entry
  }
  try {
    const primary = await dataServer([])
    const replicas = await Promise.all([0, 1].map(async () => await dataServer(['--replicaof', HOST, String(primary.port)])))
    for (const replica of replicas) {
      await until('a replica did not sync', async () => String(await redisCommand(replica.port, 'INFO', 'replication')).includes('master_link_status:up'))
    }
    const sentinels = await Promise.all(Array.from({ length: 3 }, async () => {
      const entry = member()
      entry.port = await freePort()
      const config = join(entry.dir, 'sentinel.conf')
      writeFileSync(config, [
        `port ${entry.port}`, `bind ${HOST}`, `dir ${entry.dir}`, 'protected-mode yes',
        `sentinel monitor ${name} ${HOST} ${primary.port} 2`,
        `sentinel down-after-milliseconds ${name} 1000`,
        `sentinel failover-timeout ${name} 10000`
      ].join('\n') + '\n')
      entry.running = spawnRedis(entry.dir, [config, '--sentinel', '--logfile', ''])
      return entry
    }))
    for (const sentinel of sentinels) {
      await until(`the Sentinel on ${HOST}:${sentinel.port} did not see the replicas and the other Sentinels`, async () => {
        const reply = await redisCommand(sentinel.port, 'SENTINEL', 'MASTER', name) as string[]
        const field = (key: string) => reply[reply.indexOf(key) + 1]
        return field('num-slaves') === '2' && field('num-other-sentinels') === '2'
      })
    }
    const handle = (entry: { port: number, running?: Running }): SentinelMember => ({
      port: entry.port,
      kill: async () => { if (entry.running !== undefined) await endServer(entry.running, 'SIGKILL') },
      pause: () => { entry.running?.child.kill('SIGSTOP') },
      resume: () => { entry.running?.child.kill('SIGCONT') }
    })
    return {
      name,
      sentinels: sentinels.map((sentinel) => ({ host: HOST, port: sentinel.port })),
      servers: [handle(primary), handle(replicas[0] as typeof primary), handle(replicas[1] as typeof primary)],
      primary: async () => {
        for (const sentinel of sentinels) {
          const address = await redisCommand(sentinel.port, 'SENTINEL', 'GET-MASTER-ADDR-BY-NAME', name).catch(() => null) as string[] | null
          if (address !== null) return Number(address[1])
        }
        throw new Error('no Sentinel answered')
      },
      stop
    }
  } catch (error) {
    await stop()
    throw error
  }
}

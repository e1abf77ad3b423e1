// What the benchmark runner and the profiler share: servers in child processes, their CPU time,
// and the load autocannon puts on them.
import { fork, spawn } from 'node:child_process'
import { once } from 'node:events'
import { readdirSync, readFileSync } from 'node:fs'
import { connect, createServer } from 'node:net'
import autocannon from 'autocannon'

export const connections = Number(process.env.BENCH_CONNECTIONS ?? 32)
// Every server gets the same offered load, below what the slowest one sustains: CPU per request
// falls as load rises (more requests per event-loop turn), so it is compared at equal load.
export const rate = Number(process.env.BENCH_RATE ?? 4000)
// The PostgreSQL variant uses this server (the machine's own by default): every `postgres`
// process's CPU is counted, so nothing else should use that server during the benchmark.
const databaseUrl = process.env.BENCH_DATABASE_URL ?? process.env.DATABASE_URL ?? 'postgresql://postgres@127.0.0.1:5432/postgres'
const body = JSON.stringify({ amount: 100, currency: 'EUR' })

// One prefix and one counter per benchmark run: the replay key stays the same across the
// warm-up and every run, and a fresh key is never used twice.
const prefix = `${process.pid}-${Date.now()}-`
let next = 0

// `duplicates`: this many requests in a row share a key, on a route whose handler takes 20 ms.
const DUPLICATES = 50

function request (scenario) {
  const base = { method: 'POST', path: '/orders', body, headers: { 'content-type': 'application/json' } }
  if (scenario === 'none') return [base]
  if (scenario === 'duplicates') {
    return [{
      ...base,
      path: '/slow-orders',
      setupRequest: (req) => ({ ...req, headers: { ...req.headers, 'idempotency-key': `${prefix}duplicate-${Math.floor(next++ / DUPLICATES)}` } })
    }]
  }
  if (scenario === 'replay') return [{ ...base, headers: { ...base.headers, 'idempotency-key': `${prefix}replay` } }]
  return [{
    ...base,
    setupRequest: (req) => ({ ...req, headers: { ...req.headers, 'idempotency-key': prefix + next++ } })
  }]
}

async function freePort () {
  const probe = createServer().listen(0, '127.0.0.1')
  await once(probe, 'listening')
  const { port } = probe.address()
  probe.close()
  return port
}

async function answers (port) {
  return await new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port }, () => { socket.end(); resolve(true) })
    socket.on('error', () => { resolve(false) })
  })
}

// A private redis-server per Redis variant; its CPU counts as the variant's.
async function startRedis () {
  const port = await freePort()
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
  for (let attempt = 0; attempt < 100 && !await answers(port); attempt++) {
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return { port, cpu: () => processCpu(child.pid), wakeups: () => wakeups(child.pid), stop: async () => { child.kill('SIGTERM'); await once(child, 'exit') } }
}

// Fields of /proc/PID/stat after the process name: state is [0], minflt [7], utime [11], stime [12].
function processStat (pid) {
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  } catch {
    return undefined
  }
}

// Time a process's threads spent on a CPU, in µs, from /proc (ns, where utime and stime count
// clock ticks of 10 ms: too coarse for a Redis that spends a few ms per round).
function processCpu (pid) {
  try {
    let total = 0
    for (const task of readdirSync(`/proc/${pid}/task`)) total += Number(readFileSync(`/proc/${pid}/task/${task}/schedstat`, 'utf8').split(' ')[0])
    return total / 1000
  } catch {
    return 0
  }
}

// How often a process went to sleep and was woken: Redis sleeps in epoll_wait when it has nothing
// to read, so its wake-ups count the reads that found commands, each with its syscalls.
function wakeups (pid) {
  try {
    return Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))[1])
  } catch {
    return 0
  }
}

// Every process named postgres: the server and its backends.
function postgresCpu () {
  let total = 0
  for (const pid of readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    try {
      if (readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'postgres') total += processCpu(pid)
    } catch {}
  }
  return total
}

/** Starts `benchmarks/server.js <variant>` (and its private redis-server) in child processes. */
export async function start (variant, { execArgv = [] } = {}) {
  const store = variant.replace(/-wait$/, '').replace(/^before-/, '')
  const usesRedis = store.endsWith('redis')
  const redis = usesRedis ? await startRedis() : undefined
  const env = { ...process.env, BENCH_REDIS_PORT: String(redis?.port), BENCH_DATABASE_URL: databaseUrl }
  // The PostgreSQL server is shared: its CPU is counted for each variant that uses it, so only
  // turns (one server at a time) read it apart.
  const storeCpu = usesRedis ? () => redis.cpu() : store === 'postgres' ? postgresCpu : () => 0
  const child = fork(new URL('./server.js', import.meta.url), [variant], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env, execArgv })
  const [{ port }] = await once(child, 'message')
  // CPU time in µs so far: the server's, and the store server's; and the server's minor page
  // faults, which a heap that keeps growing (a store in memory) pays for each new page.
  const cpu = async () => {
    child.send('cpu')
    const [{ cpu: usage }] = await once(child, 'message')
    return { server: usage.user + usage.system, store: storeCpu(), wakeups: redis?.wakeups() ?? 0, faults: Number(processStat(child.pid)?.[7] ?? 0) }
  }
  return {
    port,
    pid: child.pid,
    cpu,
    stop: async () => {
      child.send('stop')
      await once(child, 'exit')
      await redis?.stop()
    }
  }
}

/** Drives a server with one scenario's requests for `duration` seconds. */
export async function load (port, scenario, duration, offered = rate) {
  return await autocannon({
    url: `http://127.0.0.1:${port}`,
    connections,
    duration,
    overallRate: offered > 0 ? offered : undefined,
    requests: request(scenario)
  })
}

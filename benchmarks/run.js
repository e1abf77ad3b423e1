// `npm run bench`: server CPU per request of the plugin against bare Fastify, measured in the same run.
// Each server runs in its own child process; autocannon drives it from this one. Machines here are
// small and noisy: read the ratios, not the absolute figures.
import { fork, spawn } from 'node:child_process'
import { once } from 'node:events'
import { readdirSync, readFileSync } from 'node:fs'
import { connect, createServer } from 'node:net'
import autocannon from 'autocannon'

const connections = Number(process.env.BENCH_CONNECTIONS ?? 32)
const seconds = Number(process.env.BENCH_SECONDS ?? 3)
const runs = Number(process.env.BENCH_RUNS ?? 3)
const warmup = Number(process.env.BENCH_WARMUP ?? 2)
// Every server gets the same offered load, below what the slowest one sustains: CPU per request
// falls as load rises (more requests per event-loop turn), so it is compared at equal load.
const rate = Number(process.env.BENCH_RATE ?? 4000)
const variants = (process.env.BENCH_VARIANTS ?? 'memory,redis,postgres').split(',')
// The PostgreSQL variant uses this server (the machine's own by default): every `postgres`
// process's CPU is counted, so nothing else should use that server during the benchmark.
const databaseUrl = process.env.BENCH_DATABASE_URL ?? process.env.DATABASE_URL ?? 'postgresql://postgres@127.0.0.1:5432/postgres'
const scenarios = (process.env.BENCH_SCENARIOS ?? 'fresh,replay,none').split(',')
const body = JSON.stringify({ amount: 100, currency: 'EUR' })

// One prefix and one counter per benchmark run: the replay key stays the same across the
// warm-up and every run, and a fresh key is never used twice.
const prefix = `${process.pid}-${Date.now()}-`
let next = 0

function request (scenario) {
  const base = { method: 'POST', path: '/orders', body, headers: { 'content-type': 'application/json' } }
  if (scenario === 'none') return [base]
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
  return { port, cpu: () => processCpu(child.pid), stop: async () => { child.kill('SIGTERM'); await once(child, 'exit') } }
}

// utime + stime of a process, in µs, from /proc (clock ticks of 10 ms)
function processCpu (pid) {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
    return (Number(fields[11]) + Number(fields[12])) * 10_000
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

async function start (variant) {
  const redis = variant === 'redis' ? await startRedis() : undefined
  const env = { ...process.env, BENCH_REDIS_PORT: String(redis?.port), BENCH_DATABASE_URL: databaseUrl }
  const storeCpu = variant === 'redis' ? () => redis.cpu() : variant === 'postgres' ? postgresCpu : () => 0
  const child = fork(new URL('./server.js', import.meta.url), [variant], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env })
  const [{ port }] = await once(child, 'message')
  const cpu = async () => {
    child.send('cpu')
    const [{ cpu: usage }] = await once(child, 'message')
    return usage.user + usage.system + storeCpu()
  }
  return {
    port,
    cpu,
    stop: async () => {
      child.send('stop')
      await once(child, 'exit')
      await redis?.stop()
    }
  }
}

async function load (port, scenario, duration) {
  return await autocannon({
    url: `http://127.0.0.1:${port}`,
    connections,
    duration,
    overallRate: rate > 0 ? rate : undefined,
    requests: request(scenario)
  })
}

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]

async function sample (server, scenario) {
  const before = await server.cpu()
  const result = await load(server.port, scenario, seconds)
  const used = await server.cpu() - before
  const requests = result.requests.total
  return {
    rps: requests / seconds,
    p99: result.latency.p99,
    cpu: used / requests,
    bad: result.non2xx + result.errors + result.timeouts
  }
}

// Bare Fastify and the plugin's servers run side by side and are measured in turns, run after
// run, so that a noisy moment of the machine lands on all of them; the ratio is the median of
// the per-run ratios.
async function measure (scenario) {
  const servers = new Map()
  for (const variant of ['bare', ...variants]) servers.set(variant, await start(variant))
  try {
    for (const server of servers.values()) await load(server.port, scenario, warmup)
    const samples = new Map([...servers.keys()].map((variant) => [variant, []]))
    for (let run = 0; run < runs; run++) {
      for (const [variant, server] of servers) samples.get(variant).push(await sample(server, scenario))
    }
    const bare = samples.get('bare')
    return [...samples].map(([variant, list]) => ({
      scenario,
      variant,
      rps: median(list.map((entry) => entry.rps)),
      p99: median(list.map((entry) => entry.p99)),
      cpu: median(list.map((entry) => entry.cpu)),
      ratio: median(list.map((entry, run) => entry.cpu / bare[run].cpu)),
      bad: list.reduce((sum, entry) => sum + entry.bad, 0)
    }))
  } finally {
    for (const server of servers.values()) await server.stop()
  }
}

const rows = []
for (const scenario of scenarios) rows.push(...await measure(scenario))

console.log(`\nfastify-idempotency benchmark, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
  `${connections} connections at ${rate > 0 ? `${rate} req/s` : 'full speed'}, ${runs} runs of ${seconds} s (medians; ratio = median of per-run ratios)\n`)
console.log('| scenario | server | req/s | p99 ms | CPU µs/req | CPU ÷ bare | non-2xx/errors |')
console.log('| --- | --- | ---: | ---: | ---: | ---: | ---: |')
for (const row of rows) {
  console.log(`| ${row.scenario} | ${row.variant} | ${Math.round(row.rps)} | ${row.p99} | ${row.cpu.toFixed(1)} | ${row.ratio.toFixed(2)} | ${row.bad} |`)
}

// `npm run bench`: server CPU per request of the plugin against bare Fastify, measured in the same run.
// Each server runs in its own child process; autocannon drives it from this one. Machines here are
// small and noisy: read the ratios, not the absolute figures.
import { fork } from 'node:child_process'
import { once } from 'node:events'
import autocannon from 'autocannon'

const connections = Number(process.env.BENCH_CONNECTIONS ?? 32)
const seconds = Number(process.env.BENCH_SECONDS ?? 3)
const runs = Number(process.env.BENCH_RUNS ?? 3)
const warmup = Number(process.env.BENCH_WARMUP ?? 2)
const variants = (process.env.BENCH_VARIANTS ?? 'memory').split(',')
const scenarios = (process.env.BENCH_SCENARIOS ?? 'fresh,replay,none').split(',')
const body = JSON.stringify({ amount: 100, currency: 'EUR' })

function request (scenario) {
  let next = 0
  const prefix = `${process.pid}-${Date.now()}-`
  const base = { method: 'POST', path: '/orders', body, headers: { 'content-type': 'application/json' } }
  if (scenario === 'none') return [base]
  if (scenario === 'replay') return [{ ...base, headers: { ...base.headers, 'idempotency-key': `${prefix}replay` } }]
  return [{
    ...base,
    setupRequest: (req) => ({ ...req, headers: { ...req.headers, 'idempotency-key': prefix + next++ } })
  }]
}

async function start (variant) {
  const child = fork(new URL('./server.js', import.meta.url), [variant], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const [{ port }] = await once(child, 'message')
  const cpu = async () => {
    child.send('cpu')
    const [{ cpu: usage }] = await once(child, 'message')
    return usage.user + usage.system
  }
  return { port, cpu, stop: async () => { child.send('stop'); await once(child, 'exit') } }
}

async function load (port, scenario, duration) {
  return await autocannon({ url: `http://127.0.0.1:${port}`, connections, duration, requests: request(scenario) })
}

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]

async function measure (variant, scenario) {
  const server = await start(variant)
  try {
    await load(server.port, scenario, warmup)
    const samples = []
    for (let run = 0; run < runs; run++) {
      const before = await server.cpu()
      const result = await load(server.port, scenario, seconds)
      const used = await server.cpu() - before
      const requests = result.requests.total
      const bad = result.non2xx + result.errors + result.timeouts
      samples.push({ rps: requests / seconds, p99: result.latency.p99, cpu: used / requests, bad })
    }
    return {
      rps: median(samples.map((sample) => sample.rps)),
      p99: median(samples.map((sample) => sample.p99)),
      cpu: median(samples.map((sample) => sample.cpu)),
      bad: samples.reduce((sum, sample) => sum + sample.bad, 0)
    }
  } finally {
    await server.stop()
  }
}

const rows = []
for (const scenario of scenarios) {
  const bare = await measure('bare', scenario)
  rows.push({ scenario, variant: 'bare', ...bare, ratio: 1 })
  for (const variant of variants) {
    const result = await measure(variant, scenario)
    rows.push({ scenario, variant, ...result, ratio: result.cpu / bare.cpu })
  }
}

console.log(`\nfastify-idempotency benchmark, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
  `${connections} connections, ${runs} runs of ${seconds} s (medians)\n`)
console.log('| scenario | server | req/s | p99 ms | CPU µs/req | CPU ÷ bare | non-2xx/errors |')
console.log('| --- | --- | ---: | ---: | ---: | ---: | ---: |')
for (const row of rows) {
  console.log(`| ${row.scenario} | ${row.variant} | ${Math.round(row.rps)} | ${row.p99} | ${row.cpu.toFixed(1)} | ${row.ratio.toFixed(2)} | ${row.bad} |`)
}

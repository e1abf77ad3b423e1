// `npm run bench`: server CPU per request of the plugin against bare Fastify, measured in the same run.
// Each server runs in its own child process; autocannon drives it from this one. Machines here are
// small and noisy: read the ratios, not the absolute figures.
import { connections, load, rate, start } from './servers.js'

const seconds = Number(process.env.BENCH_SECONDS ?? 2)
const runs = Number(process.env.BENCH_RUNS ?? 11)
const warmup = Number(process.env.BENCH_WARMUP ?? 2)
const variants = (process.env.BENCH_VARIANTS ?? 'control,floor,memory,floor-redis,redis,node-idempotency-redis').split(',')
const scenarios = (process.env.BENCH_SCENARIOS ?? 'fresh,replay,none').split(',')
// `together` (the default): all servers at once, so that every round's window is the same for
// all of them; each gets 1 500 req/s unless BENCH_RATE says. `turns`: one server at a time.
const mode = process.env.BENCH_MODE ?? 'together'
if (mode !== 'turns' && mode !== 'together') throw new Error(`BENCH_MODE must be turns or together, not ${mode}`)
const offered = mode === 'together' && process.env.BENCH_RATE === undefined ? 1500 : rate

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]

async function sample (server, scenario) {
  const before = await server.cpu()
  const result = await load(server.port, scenario, seconds, offered)
  const after = await server.cpu()
  return cpuPerRequest(before, after, result)
}

async function sampleTogether (servers, scenario) {
  const before = await Promise.all(servers.map((server) => server.cpu()))
  const results = await Promise.all(servers.map((server) => load(server.port, scenario, seconds, offered)))
  const after = await Promise.all(servers.map((server) => server.cpu()))
  return servers.map((_, index) => cpuPerRequest(before[index], after[index], results[index]))
}

function cpuPerRequest (before, after, result) {
  const requests = result.requests.total
  const store = (after.store - before.store) / requests
  return {
    rps: requests / seconds,
    p99: result.latency.p99,
    cpu: (after.server - before.server) / requests + store,
    store,
    bad: result.non2xx + result.errors + result.timeouts,
    faults: (after.faults - before.faults) / requests,
    wakeups: (after.wakeups - before.wakeups) / requests
  }
}

// Bare Fastify and the plugin's servers run side by side and are measured in turns, run after
// run, or all at once, so that a noisy moment of the machine lands on all of them; the ratio is
// the median of the per-run ratios.
async function measure (scenario) {
  const servers = new Map()
  for (const variant of ['bare', ...variants]) servers.set(variant, await start(variant))
  try {
    if (mode === 'together') await Promise.all([...servers.values()].map((server) => load(server.port, scenario, warmup, offered)))
    else for (const server of servers.values()) await load(server.port, scenario, warmup, offered)
    const samples = new Map([...servers.keys()].map((variant) => [variant, []]))
    for (let run = 0; run < runs; run++) {
      if (mode === 'together') {
        const taken = await sampleTogether([...servers.values()], scenario)
        ;[...servers.keys()].forEach((variant, index) => samples.get(variant).push(taken[index]))
      } else {
        for (const [variant, server] of servers) samples.get(variant).push(await sample(server, scenario))
      }
    }
    const bare = samples.get('bare')
    for (const [variant, list] of samples) {
      // A version against another (`before-*`, see server.js) in the same rounds: the median of the
      // per-round ratios of their CPU per request.
      const other = samples.get(`before-${variant}`)
      if (other !== undefined) pairs.push({ scenario, variant, ratios: list.map((entry, run) => entry.cpu / other[run].cpu).sort((a, b) => a - b) })
      // The plugin against the least an idempotency layer does, in the same rounds: the median of
      // the per-round differences of their CPU per request, in units of bare Fastify's.
      const floor = samples.get(floorOf(variant))
      if (floor !== undefined && !['bare', 'control', 'floor', 'floor-redis', 'node-idempotency-redis'].includes(variant)) {
        overFloor.push({ scenario, variant, differences: list.map((entry, run) => (entry.cpu - floor[run].cpu) / bare[run].cpu).sort((a, b) => a - b) })
      }
      // The plugin's Redis store against @node-idempotency's Redis adapter, in the same rounds:
      // the whole request's CPU (app and Redis), and Redis's alone.
      const rival = samples.get('node-idempotency-redis')
      if (rival !== undefined && variant.replace(/^before-/, '').startsWith('redis')) {
        const ratios = (of) => list.map((entry, run) => of(entry) / of(rival[run])).sort((a, b) => a - b)
        versus.push({ scenario, variant, whole: ratios((entry) => entry.cpu), store: ratios((entry) => entry.store) })
      }
    }
    return [...samples].map(([variant, list]) => ({
      scenario,
      variant,
      rps: median(list.map((entry) => entry.rps)),
      p99: median(list.map((entry) => entry.p99)),
      cpu: median(list.map((entry) => entry.cpu)),
      store: median(list.map((entry) => entry.store)),
      ratio: median(list.map((entry, run) => entry.cpu / bare[run].cpu)),
      ratios: list.map((entry, run) => entry.cpu / bare[run].cpu).sort((a, b) => a - b),
      bad: list.reduce((sum, entry) => sum + entry.bad, 0),
      faults: median(list.map((entry) => entry.faults)),
      wakeups: median(list.map((entry) => entry.wakeups))
    }))
  } finally {
    for (const server of servers.values()) await server.stop()
  }
}

const rows = []
const pairs = []
const overFloor = []
const versus = []
const floorOf = (variant) => variant.replace(/^before-/, '').endsWith('redis') ? 'floor-redis' : variant === 'postgres' ? undefined : 'floor'
for (const scenario of scenarios) rows.push(...await measure(scenario))

console.log(`\nfastify-idempotency benchmark, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
  `${connections} connections at ${offered > 0 ? `${offered} req/s` : 'full speed'}${mode === 'together' ? ' each, all servers at once' : ', servers in turns'}, ${runs} runs of ${seconds} s (medians; ratio = median of per-run ratios)\n`)
// One Redis core runs a command at a time: its CPU per request bounds the requests per second of
// the whole fleet that shares it.
console.log('| scenario | server | req/s | p99 ms | CPU µs/req | of which store | store core ceiling, req/s | Redis wake-ups/req | CPU ÷ bare | lowest–highest run | page faults/req | non-2xx/errors |')
console.log('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
for (const row of rows) {
  const ceiling = row.store > 0 ? Math.round(1e6 / row.store) : '–'
  console.log(`| ${row.scenario} | ${row.variant} | ${Math.round(row.rps)} | ${row.p99} | ${row.cpu.toFixed(1)} | ${row.store.toFixed(1)} | ${ceiling} | ${row.store > 0 ? row.wakeups.toFixed(2) : '–'} | ${row.ratio.toFixed(2)} | ${row.ratios[0].toFixed(2)}–${row.ratios.at(-1).toFixed(2)} | ${row.faults.toFixed(3)} | ${row.bad} |`)
}
if (versus.length > 0) {
  console.log('\n| scenario | server | whole request ÷ node-idempotency-redis, same round | lowest–highest | Redis CPU ÷ node-idempotency-redis\'s | lowest–highest |')
  console.log('| --- | --- | ---: | ---: | ---: | ---: |')
  for (const row of versus) {
    console.log(`| ${row.scenario} | ${row.variant} | ${median(row.whole).toFixed(3)} | ${row.whole[0].toFixed(2)}–${row.whole.at(-1).toFixed(2)} | ${median(row.store).toFixed(3)} | ${row.store[0].toFixed(2)}–${row.store.at(-1).toFixed(2)} |`)
  }
}
if (overFloor.length > 0) {
  console.log('\n| scenario | server | (CPU − floor) ÷ bare, same round | lowest–highest round |')
  console.log('| --- | --- | ---: | ---: |')
  for (const row of overFloor) {
    console.log(`| ${row.scenario} | ${row.variant} | ${median(row.differences).toFixed(3)} | ${row.differences[0].toFixed(2)}–${row.differences.at(-1).toFixed(2)} |`)
  }
}
if (pairs.length > 0) {
  console.log('\n| scenario | server | CPU ÷ before-server, same round | lowest–highest round |')
  console.log('| --- | --- | ---: | ---: |')
  for (const pair of pairs) {
    console.log(`| ${pair.scenario} | ${pair.variant} | ${median(pair.ratios).toFixed(3)} | ${pair.ratios[0].toFixed(2)}–${pair.ratios.at(-1).toFixed(2)} |`)
  }
}

// `npm run bench:profile -- <variant> <scenario> [cpu-prof|perf]`: where one server's time goes
// under the benchmark's load, summed by function (self time), by package, and for the plugin's
// own functions with what they call.
// - `cpu-prof` (the default): `node --cpu-prof`. It samples wall-clock time: time in a system call
//   (writev) includes waiting for the CPU, so compare functions with each other and with bare
//   Fastify's profile, not with `npm run bench`.
// - `perf`: Linux `perf record -e cpu-clock` on the server, which runs with
//   `--perf-basic-prof-only-functions`. It counts time on the CPU, per thread, kernel included:
//   figures in µs per request that add up to what `npm run bench` reads. Needs `perf` (Debian:
//   linux-perf) and the right to trace the server (root, or kernel.perf_event_paranoid <= 1).
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { load, start } from './servers.js'

const [variant = 'memory', scenario = 'fresh', sampler = 'cpu-prof'] = process.argv.slice(2)
const seconds = Number(process.env.BENCH_SECONDS ?? 5)
const top = Number(process.env.PROFILE_TOP ?? 30)
const directory = fileURLToPath(new URL(`./results/profiles/${variant}-${scenario}-${sampler}-${Date.now()}`, import.meta.url))
mkdirSync(directory, { recursive: true })

// A sample is a stack, leaf first, of frames { functionName, url }, and the time it stands for.
const { stacks, requests, others, file } = sampler === 'perf' ? await perfSamples() : await cpuProfileSamples()

async function cpuProfileSamples () {
  const server = await start(variant, { execArgv: ['--cpu-prof', `--cpu-prof-dir=${directory}`] })
  const warmup = await load(server.port, scenario, 2)
  const result = await load(server.port, scenario, seconds)
  await server.stop()
  const file = join(directory, readdirSync(directory).find((name) => name.endsWith('.cpuprofile')))
  const profile = JSON.parse(readFileSync(file, 'utf8'))
  const nodes = new Map(profile.nodes.map((node) => [node.id, node]))
  const parents = new Map()
  for (const node of profile.nodes) for (const child of node.children ?? []) parents.set(child, node.id)
  const stacks = []
  for (let index = 0; index < profile.samples.length; index++) {
    const frames = []
    for (let at = profile.samples[index]; at !== undefined; at = parents.get(at)) frames.push(nodes.get(at).callFrame)
    stacks.push({ frames, time: profile.timeDeltas[index] })
  }
  // The profile covers the warm-up too.
  return { stacks, requests: warmup.requests.total + result.requests.total, others: undefined, file }
}

async function perfSamples () {
  if (spawnSync('perf', ['--version']).error !== undefined) {
    console.error('perf is not installed (Debian: apt-get install linux-perf)')
    process.exit(1)
  }
  const file = join(directory, 'perf.data')
  const frequency = 4000
  const server = await start(variant, { execArgv: ['--perf-basic-prof-only-functions'] })
  await load(server.port, scenario, 4)
  const perf = spawn('perf', ['record', '-e', 'cpu-clock', '-F', String(frequency), '-g', '-p', String(server.pid), '-o', file], { stdio: 'ignore' })
  await new Promise((resolve) => setTimeout(resolve, 500))
  const result = await load(server.port, scenario, seconds)
  perf.kill('SIGINT')
  await once(perf, 'exit')
  await server.stop()
  keepNewestSymbols(`/tmp/perf-${server.pid}.map`)
  const script = spawnSync('perf', ['script', '-i', file, '-F', 'pid,tid,ip,sym,dso'], { maxBuffer: 1 << 30, encoding: 'utf8' })
  const stacks = []
  let others = 0
  let main = false
  let frames
  for (const line of script.stdout.split('\n')) {
    if (line.trim() === '') {
      if (frames !== undefined && main) stacks.push({ frames, time: 1e6 / frequency })
      if (frames !== undefined && !main) others += 1e6 / frequency
      frames = undefined
    } else if (frames === undefined) {
      const [pid, tid] = line.trim().split(/\s+/)[0].split('/')
      main = pid === tid
      frames = []
    } else {
      frames.push(perfFrame(line.trim()))
    }
  }
  return { stacks, requests: result.requests.total, others, file }
}

// V8 reuses code space, and appends to its map: the newest symbol at an address is the right one.
function keepNewestSymbols (path) {
  const kept = []
  for (const line of readFileSync(path, 'utf8').split('\n').reverse()) {
    const [start, size] = line.split(' ', 2).map((hex) => parseInt(hex, 16))
    if (!(size > 0) || kept.some((entry) => entry.start < start + size && start < entry.end)) continue
    kept.push({ start, end: start + size, line })
  }
  writeFileSync(path, kept.map((entry) => entry.line).join('\n') + '\n')
}

// `ip symbol (dso)`; a JavaScript symbol reads `JS:*name file:///path:line:column`.
function perfFrame (line) {
  const symbol = line.slice(line.indexOf(' ') + 1, line.lastIndexOf(' ('))
  const dso = line.slice(line.lastIndexOf(' (') + 2, -1)
  const script = symbol.match(/^(?:JS|Eval):[*~^+]?(\S*) (?:file:\/\/)?(\S+):(\d+):\d+$/)
  if (script === null) return { functionName: symbol, url: `[${dso.replace(/^.*\//, '')}]`, lineNumber: -1 }
  return { functionName: script[1], url: script[2], lineNumber: Number(script[3]) - 1 }
}

const where = ({ url, lineNumber }) => url === '' || lineNumber < 0 ? url : `${url.replace(/^.*\/(node_modules|dist|benchmarks)\//, '$1/')}:${lineNumber + 1}`
const label = (frame) => `${frame.functionName || '(anonymous)'} ${where(frame)}`
const pluginDist = fileURLToPath(new URL('../dist/', import.meta.url))
function packageOf ({ url, functionName }) {
  if (url === '') return functionName
  if (url.startsWith('[')) return url
  if (url.includes(pluginDist) || (!url.includes('node_modules') && url.includes('/dist/'))) return 'fastify-idempotency'
  const inModules = url.match(/node_modules\/((@[^/]+\/)?[^/]+)/)
  if (inModules !== null) return inModules[1]
  if (url.startsWith('node:')) return 'node'
  return url
}

const bySelf = new Map()
const byPackage = new Map()
const inclusive = new Map()
const charged = new Map()
let busy = 0
for (const { frames, time } of stacks) {
  if (frames[0]?.functionName === '(idle)') continue
  busy += time
  bySelf.set(label(frames[0]), (bySelf.get(label(frames[0])) ?? 0) + time)
  byPackage.set(packageOf(frames[0]), (byPackage.get(packageOf(frames[0])) ?? 0) + time)
  // Each of the plugin's functions on the stack is charged once per sample.
  const seen = new Set()
  let handedBack = false
  for (const frame of frames) {
    const owner = packageOf(frame)
    if (owner === 'fastify' || frame.url.endsWith('/benchmarks/server.js')) handedBack = true
    if (owner !== 'fastify-idempotency') continue
    // The plugin's cost: the sample is charged to the nearest plugin frame, unless the plugin had
    // handed control back to Fastify (a hook's `next()`) between it and the sample.
    if (seen.size === 0 && !handedBack) charged.set(label(frame), (charged.get(label(frame)) ?? 0) + time)
    const name = label(frame)
    if (seen.has(name)) continue
    seen.add(name)
    inclusive.set(name, (inclusive.get(name) ?? 0) + time)
  }
}

const perRequest = (time) => (time / requests).toFixed(2).padStart(7)
const share = (time) => `${(100 * time / busy).toFixed(1).padStart(5)} %`
const print = (title, entries) => {
  console.log(`\n${title}\n   µs/req    share`)
  for (const [name, time] of [...entries].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`  ${perRequest(time)}  ${share(time)}  ${name}`)
  }
}

console.log(`${variant} ${scenario} (${sampler}): ${requests} requests; samples in ${file}`)
console.log(`busy time: ${perRequest(busy)} µs per request${others === undefined ? '' : ` on the main thread, ${perRequest(others).trim()} on the others (V8's helpers, libuv)`}`)
print('by package (self time)', byPackage)
print('by function (self time)', bySelf)
print("the plugin's functions (inclusive time)", inclusive)
const own = [...charged.values()].reduce((sum, time) => sum + time, 0)
print(`the plugin's own cost, with what it calls but not what Fastify runs after a hook's next(): ${perRequest(own)} µs/req`, charged)

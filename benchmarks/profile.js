// `npm run bench:profile -- <variant> <scenario>`: where one server's time goes under the
// benchmark's load. The server runs with `node --cpu-prof`; the profile is summed by function
// (self time), by package, and for the plugin's own functions with what they call. A profile
// samples wall-clock time: time in a system call (writev) includes waiting for the CPU, so
// compare functions with each other and with bare Fastify's profile, not with `npm run bench`.
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { load, start } from './servers.js'

const [variant = 'memory', scenario = 'fresh'] = process.argv.slice(2)
const seconds = Number(process.env.BENCH_SECONDS ?? 5)
const top = Number(process.env.PROFILE_TOP ?? 30)
const directory = fileURLToPath(new URL(`./results/profiles/${variant}-${scenario}-${Date.now()}`, import.meta.url))

const server = await start(variant, { execArgv: ['--cpu-prof', `--cpu-prof-dir=${directory}`] })
const warmup = await load(server.port, scenario, 2)
const result = await load(server.port, scenario, seconds)
await server.stop()
// The profile covers the warm-up too.
const requests = warmup.requests.total + result.requests.total

const file = join(directory, readdirSync(directory).find((name) => name.endsWith('.cpuprofile')))
const profile = JSON.parse(readFileSync(file, 'utf8'))
const nodes = new Map(profile.nodes.map((node) => [node.id, node]))
const parents = new Map()
for (const node of profile.nodes) for (const child of node.children ?? []) parents.set(child, node.id)

const self = new Map()
for (let index = 0; index < profile.samples.length; index++) {
  const id = profile.samples[index]
  self.set(id, (self.get(id) ?? 0) + profile.timeDeltas[index])
}

const where = ({ callFrame: { url, lineNumber } }) => url === '' ? '' : `${url.replace(/^.*\/(node_modules|dist|benchmarks)\//, '$1/')}:${lineNumber + 1}`
const label = (node) => `${node.callFrame.functionName || '(anonymous)'} ${where(node)}`
function packageOf ({ callFrame: { url, functionName } }) {
  if (url === '') return functionName
  const inModules = url.match(/node_modules\/((@[^/]+\/)?[^/]+)/)
  if (inModules !== null) return inModules[1]
  if (url.includes('/dist/')) return 'fastify-idempotency'
  if (url.startsWith('node:')) return 'node'
  return url
}

const bySelf = new Map()
const byPackage = new Map()
const inclusive = new Map()
const charged = new Map()
let busy = 0
for (const [id, time] of self) {
  const node = nodes.get(id)
  if (node.callFrame.functionName === '(idle)') continue
  busy += time
  bySelf.set(label(node), (bySelf.get(label(node)) ?? 0) + time)
  byPackage.set(packageOf(node), (byPackage.get(packageOf(node)) ?? 0) + time)
  // Each of the plugin's functions on the stack is charged once per sample.
  const seen = new Set()
  let handedBack = false
  for (let at = id; at !== undefined; at = parents.get(at)) {
    const frame = nodes.get(at)
    const owner = packageOf(frame)
    if (owner === 'fastify' || frame.callFrame.url.endsWith('/benchmarks/server.js')) handedBack = true
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

console.log(`${variant} ${scenario}: ${requests} requests in ${seconds + 2} s; profile ${file}`)
console.log(`busy time: ${perRequest(busy)} µs per request`)
print('by package (self time)', byPackage)
print('by function (self time)', bySelf)
print("the plugin's functions (inclusive time)", inclusive)
const own = [...charged.values()].reduce((sum, time) => sum + time, 0)
print(`the plugin's own cost, with what it calls but not what Fastify runs after a hook's next(): ${perRequest(own)} µs/req`, charged)

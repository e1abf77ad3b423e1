import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import t, { type Test } from 'tap'
import ts from 'typescript'
import { redisCommand, requireRedis, startRedis, startRedisCluster } from './helpers/redis-server.js'

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

async function answers (port: number): Promise<boolean> {
  return await redisCommand(port, 'PING').then(() => true, () => false)
}

/**
 * Runs a process that starts a server through the helper and then forgets it or is killed, and resolves
 * with that server once the process has ended. The process runs the helper compiled to JavaScript:
 * tap's TypeScript loader takes seconds to start.
 */
async function orphanedServer (t: Test, ending: 'forgets stop()' | 'is killed'): Promise<{ port: number, dir: string }> {
  const folder = mkdtempSync(join(tmpdir(), 'idempotency-harness-'))
  t.teardown(() => { rmSync(folder, { recursive: true, force: true }) })
  const source = readFileSync(new URL('./helpers/redis-server.ts', import.meta.url), 'utf8')
  const compiled = ts.transpileModule(source, { compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, verbatimModuleSyntax: true } })
  writeFileSync(join(folder, 'redis-server.mjs'), compiled.outputText)
  const script = `
    const { startRedis } = await import('./redis-server.mjs')
    const server = await startRedis({ persistence: true })
    process.stdout.write(JSON.stringify({ port: server.port, dir: server.dir }) + '\\n')
    if (${JSON.stringify(ending)} === 'is killed') setInterval(() => {}, 1000)
  `
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { cwd: folder, stdio: ['ignore', 'pipe', 'inherit'] })
  const exited = once(child, 'exit')
  const [line] = await once(createInterface({ input: child.stdout }), 'line') as [string]
  if (ending === 'is killed') child.kill('SIGKILL')
  await exited
  return JSON.parse(line) as { port: number, dir: string }
}

if (requireRedis(t)) {
  t.test('starts a private redis-server that answers PING', async (t) => {
    const server = await startRedis()
    t.teardown(() => server.stop())
    t.equal(server.host, '127.0.0.1')
    t.not(server.port, 6379, 'not the system Redis')
    t.equal(server.url, `redis://127.0.0.1:${server.port}`)
    t.ok(server.dir.startsWith(tmpdir()) && existsSync(server.dir), 'its folder is a new one under the temporary folder')
    t.equal(await redisCommand(server.port, 'PING'), 'PONG')
    t.same(await redisCommand(server.port, 'CONFIG', 'GET', 'bind'), ['bind', '127.0.0.1'])
    t.same(await redisCommand(server.port, 'CONFIG', 'GET', 'dir'), ['dir', server.dir])
    t.same(await redisCommand(server.port, 'CONFIG', 'GET', 'appendonly'), ['appendonly', 'no'])
    t.equal(await redisCommand(server.port, 'DBSIZE'), '0', 'empty')
  })

  t.test('restarts on the same port and keeps data when persistent', async (t) => {
    const server = await startRedis({ persistence: true })
    t.teardown(() => server.stop())
    t.same(await redisCommand(server.port, 'CONFIG', 'GET', 'appendfsync'), ['appendfsync', 'always'])
    await redisCommand(server.port, 'SET', 'before-stop', 'kept')
    await server.stop()
    t.notOk(await answers(server.port), 'down after stop()')
    await server.start()
    t.equal(await redisCommand(server.port, 'GET', 'before-stop'), 'kept', 'kept across stop() and start()')

    await redisCommand(server.port, 'SET', 'before-kill', 'kept too')
    await server.kill()
    t.notOk(await answers(server.port), 'down after kill()')
    await server.start()
    t.equal(await redisCommand(server.port, 'GET', 'before-kill'), 'kept too', 'kept across kill() and start(): every write is synced')
    t.equal(await redisCommand(server.port, 'GET', 'before-stop'), 'kept')
  })

  t.test('stop is idempotent', async (t) => {
    const server = await startRedis()
    await Promise.all([server.stop(), server.stop()])
    await server.stop()
    await server.kill()
    t.notOk(await answers(server.port), 'down')
    await Promise.all([server.start(), server.start()])
    t.equal(await redisCommand(server.port, 'PING'), 'PONG', 'started again once')
    await server.stop()
    t.notOk(await answers(server.port), 'down again')
  })

  t.test('a cluster of three masters reaches cluster_state:ok', async (t) => {
    const cluster = await startRedisCluster()
    t.teardown(() => cluster.stop())
    t.equal(cluster.nodes.length, 3)
    for (const node of cluster.nodes) {
      t.equal(node.host, '127.0.0.1')
      const info = String(await redisCommand(node.port, 'CLUSTER', 'INFO'))
      t.match(info, /cluster_state:ok\r\n/, `${node.port} says ok`)
      t.match(info, /cluster_slots_assigned:16384\r\n/)
      t.match(info, /cluster_known_nodes:3\r\n/)
      t.match(info, /cluster_size:3\r\n/, 'three masters with slots')
    }
    await cluster.stop()
    for (const node of cluster.nodes) t.notOk(await answers(node.port), `${node.port} down after stop()`)
  })

  t.test('a server outlives neither a test process that forgets stop() nor one that is killed', async (t) => {
    const servers = await Promise.all([orphanedServer(t, 'forgets stop()'), orphanedServer(t, 'is killed')])
    const deadline = Date.now() + 5000
    for (const server of servers) {
      while ((await answers(server.port) || existsSync(server.dir)) && Date.now() < deadline) await sleep(20)
      t.notOk(await answers(server.port), `nothing answers on ${server.port}`)
      t.notOk(existsSync(server.dir), `${server.dir} is removed`)
    }
  })
}

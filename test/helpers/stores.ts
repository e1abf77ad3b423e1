import { MemoryStore, type Awaitable, type IdempotencyStore, type NewRecord, type RecordUpdate } from '../../lib/index.js'

type Operation = 'insert' | 'lookup' | 'update' | 'delete' | 'prune'

/**
 * A memory store whose calls can be made to fail, to stand for a store server that is down.
 * It records every call, so tests can see what reached the store. A failing call rejects, or,
 * with `throws`, throws at once, as a custom store that breaks its promise might.
 */
export class FaultyStore implements IdempotencyStore {
  readonly inner: MemoryStore
  readonly calls: Array<{ operation: Operation, key?: string, state?: string }> = []
  readonly throws: boolean
  failing = new Set<Operation>()
  /** When set, a failing call rejects after this many ms, like a client timing out. */
  failAfter = 0
  /** ms an operation waits before it runs. */
  delays = new Map<Operation, number>()

  constructor (inner = new MemoryStore(), { throws = false } = {}) {
    this.inner = inner
    this.throws = throws
  }

  insert (key: string, record: NewRecord) {
    return this.#call('insert', () => this.inner.insert(key, record), key)
  }

  lookup (key: string) {
    return this.#call('lookup', () => this.inner.lookup(key), key)
  }

  update (key: string, owner: string, update: RecordUpdate) {
    return this.#call('update', () => this.inner.update(key, owner, update), key, update.state)
  }

  delete (key: string, owner: string) {
    return this.#call('delete', () => this.inner.delete(key, owner), key)
  }

  prune () {
    return this.#call('prune', () => this.inner.prune())
  }

  #call<Result> (operation: Operation, run: () => Awaitable<Result>, key?: string, state?: string): Promise<Result> {
    this.calls.push({ operation, key, state })
    const failing = this.failing.has(operation)
    if (failing && this.throws) throw new Error(`store ${operation} failed`)
    const wait = failing ? this.failAfter : this.delays.get(operation) ?? 0
    return (async () => {
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait))
      if (failing) throw new Error(`store ${operation} failed`)
      return await run()
    })()
  }
}

import { MemoryStore, type IdempotencyStore, type NewRecord, type RecordUpdate } from '../../lib/index.js'

type Operation = 'insert' | 'lookup' | 'update' | 'delete' | 'prune'

/**
 * A memory store whose calls can be made to fail, to stand for a store server that is down.
 * It records every call, so tests can see what reached the store.
 */
export class FaultyStore implements IdempotencyStore {
  readonly inner: MemoryStore
  readonly calls: Array<{ operation: Operation, key?: string, state?: string }> = []
  failing = new Set<Operation>()
  /** When set, a failing call rejects after this many ms, like a client timing out. */
  failAfter = 0

  constructor (inner = new MemoryStore()) {
    this.inner = inner
  }

  async insert (key: string, record: NewRecord) {
    await this.#enter('insert', key)
    return await this.inner.insert(key, record)
  }

  async lookup (key: string) {
    await this.#enter('lookup', key)
    return await this.inner.lookup(key)
  }

  async update (key: string, owner: string, update: RecordUpdate) {
    await this.#enter('update', key, update.state)
    return await this.inner.update(key, owner, update)
  }

  async delete (key: string, owner: string) {
    await this.#enter('delete', key)
    return await this.inner.delete(key, owner)
  }

  async prune () {
    await this.#enter('prune')
    return await this.inner.prune()
  }

  async #enter (operation: Operation, key?: string, state?: string): Promise<void> {
    this.calls.push({ operation, key, state })
    if (!this.failing.has(operation)) return
    if (this.failAfter > 0) await new Promise((resolve) => setTimeout(resolve, this.failAfter))
    throw new Error(`store ${operation} failed`)
  }
}

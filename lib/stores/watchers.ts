/**
 * Who waits for which key's record, as a store's `watch` keeps it: the listeners of each key,
 * told one key at a time or all at once (after a reconnect, when messages may have been lost).
 */
export class Watchers {
  readonly #byKey = new Map<string, Set<() => void>>()

  /**
   * Adds `listener` for `key`; answers the function that removes it. `opened` runs when the key
   * had no listener yet, with a function that tells the key's listeners; `closed` runs once its
   * last listener is removed.
   */
  add (key: string, listener: () => void, opened?: (tell: () => void) => void, closed?: () => void): () => void {
    let listeners = this.#byKey.get(key)
    if (listeners === undefined) {
      listeners = new Set()
      this.#byKey.set(key, listeners)
      const watching = listeners
      opened?.(() => { for (const told of watching) told() })
    }
    const watching = listeners
    watching.add(listener)
    return () => {
      watching.delete(listener)
      // Removed twice, or after clear(): another set may hold the key now.
      if (watching.size > 0 || this.#byKey.get(key) !== watching) return
      this.#byKey.delete(key)
      closed?.()
    }
  }

  tell (key: string): void {
    this.#byKey.get(key)?.forEach((told) => { told() })
  }

  tellAll (): void {
    for (const listeners of this.#byKey.values()) for (const told of listeners) told()
  }

  keys (): string[] {
    return [...this.#byKey.keys()]
  }

  get size (): number {
    return this.#byKey.size
  }

  clear (): void {
    this.#byKey.clear()
  }
}

/** Resolves after `ms`. */
export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

/** A promise and the function that resolves it: a gate a test opens when it chooses. */
export function deferred (): { promise: Promise<void>, resolve: () => void } {
  let open!: () => void
  const promise = new Promise<void>((resolve) => { open = resolve })
  return { promise, resolve: open }
}

/** The idempotency key header. */
export const key = (value: string): Record<string, string> => ({ 'idempotency-key': value })

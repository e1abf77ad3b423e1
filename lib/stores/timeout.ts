/**
 * Settles as `sent` does, or rejects with `message` after `ms`, calling `onTimeout` first so that
 * a store can undo what the late operation may still do.
 */
export async function withTimeout<Result> (sent: Promise<Result>, ms: number, message: string, onTimeout?: () => void): Promise<Result> {
  return await new Promise<Result>((resolve, reject) => {
    const timer = setTimeout(() => {
      onTimeout?.()
      reject(new Error(message))
    }, ms)
    sent.then((result) => {
      clearTimeout(timer)
      resolve(result)
    }, (error: unknown) => {
      clearTimeout(timer)
      reject(error)
    })
  })
}

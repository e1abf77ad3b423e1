import { once } from 'node:events'
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net'

/** A TCP proxy on a loopback port in front of a server: a network that a test can break. */
export interface Proxy {
  readonly port: number
  /** From now on the server's bytes are dropped; the client's still reach it. */
  dropReplies (): void
  /** Closes every connection and refuses new ones, until `heal`. */
  cut (): Promise<void>
  /** Accepts connections again, on the same port, and forwards both ways. */
  heal (): Promise<void>
  close (): Promise<void>
}

export async function startProxy (targetPort: number): Promise<Proxy> {
  const sockets = new Set<Socket>()
  let dropping = false
  let server: Server | undefined
  let port = 0

  const listen = async (): Promise<void> => {
    const listening = createServer((client) => {
      const upstream = connect({ host: '127.0.0.1', port: targetPort })
      sockets.add(client)
      sockets.add(upstream)
      client.on('data', (chunk) => upstream.write(chunk))
      upstream.on('data', (chunk) => { if (!dropping) client.write(chunk) })
      const close = (): void => {
        client.destroy()
        upstream.destroy()
        sockets.delete(client)
        sockets.delete(upstream)
      }
      for (const socket of [client, upstream]) {
        socket.on('close', close)
        socket.on('error', close)
      }
    })
    listening.listen(port, '127.0.0.1')
    await once(listening, 'listening')
    port = (listening.address() as AddressInfo).port
    server = listening
  }

  const stop = async (): Promise<void> => {
    const closing = server
    server = undefined
    for (const socket of sockets) socket.destroy()
    sockets.clear()
    if (closing !== undefined) await new Promise((resolve) => closing.close(resolve))
  }

  await listen()
  return {
    get port () { return port },
    dropReplies: () => { dropping = true },
    cut: stop,
    heal: async () => {
      dropping = false
      if (server === undefined) await listen()
    },
    close: stop
  }
}

import { connect } from 'node:net'

/** Sends raw bytes to a listening server on loopback and resolves the raw response text. */
export async function rawRequest (port: number, request: string): Promise<string> {
  return await new Promise((resolve, reject) => {
    const socket = connect({ host: '127.0.0.1', port })
    const chunks: Buffer[] = []
    socket.on('data', (chunk: Buffer) => chunks.push(chunk))
    socket.on('end', () => { resolve(Buffer.concat(chunks).toString('latin1')) })
    socket.on('error', reject)
    socket.write(request)
  })
}

/** Sends a request and destroys the socket once the server has received it, like a client that gives up. */
export async function abandonRequest (port: number, request: string, after: Promise<void>): Promise<void> {
  const socket = connect({ host: '127.0.0.1', port })
  socket.on('error', () => {})
  socket.write(request)
  await after
  socket.destroy()
}

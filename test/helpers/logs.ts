import { Writable } from 'node:stream'

export interface LogLine {
  level: number
  msg: string
  [field: string]: unknown
}

/** A pino destination that keeps every log line, parsed. */
export function logCollector (): { stream: Writable, lines: LogLine[], find: (level: number, text: string) => LogLine | undefined } {
  const lines: LogLine[] = []
  const stream = new Writable({
    write (chunk: Buffer, _encoding, callback) {
      for (const line of chunk.toString().split('\n')) {
        if (line !== '') lines.push(JSON.parse(line) as LogLine)
      }
      callback()
    }
  })
  return {
    stream,
    lines,
    find: (level, text) => lines.find((line) => line.level === level && line.msg.includes(text))
  }
}

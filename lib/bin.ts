#!/usr/bin/env node
// The command line's entry: its logic is in cli.ts, which the tests run in their own process.
// This file runs only in a child process, which tap's coverage does not see.
/* c8 ignore start */
import { main } from './cli.js'

process.exitCode = await main(process.argv.slice(2), process)
/* c8 ignore stop */

import neostandard from 'neostandard'

export default [
  ...neostandard({
    ts: true,
    ignores: ['dist/**', 'coverage/**', 'benchmarks/results/**', '.tap/**']
  }),
  {
    // `void promise` marks a promise that is deliberately not awaited (it handles its own failure).
    rules: { 'no-void': ['error', { allowAsStatement: true }] }
  }
]

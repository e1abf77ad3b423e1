// Every test counts toward the coverage of lib/ only: helpers and the built package are not measured.
export default function coverageMap () {
  return ['lib/**/*.ts']
}

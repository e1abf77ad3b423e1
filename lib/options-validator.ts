import type { Static, TObject, TProperties, TSchema } from 'typebox'
import { Compile } from 'typebox/compile'
import { InvalidOptionError } from './errors.js'

interface OptionError {
  instancePath: string
  keyword: string
  message: string
  params: unknown
}

/**
 * Compiles an options schema into a function that checks a value, fills in the schema's
 * defaults and throws `InvalidOptionError` naming the first bad option and its rule.
 */
export function compileOptions<Schema extends TObject> (
  schema: Schema,
  label: string
): (value: unknown) => Static<Schema> & Defaulted<Schema> {
  const validator = Compile(schema)
  const defaults = Object.entries(schema.properties as TProperties)
    .filter(([, property]) => 'default' in property)
    .map(([name, property]) => [name, (property as TSchema & { default: unknown }).default] as const)

  return function validate (value) {
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw new InvalidOptionError(`${label} options must be an object`)
    }
    if (!validator.Check(value)) {
      throw new InvalidOptionError(describe(schema, label, [...validator.Errors(value)] as OptionError[]))
    }
    const settings: Record<string, unknown> = { ...value }
    for (const [name, fallback] of defaults) {
      if (settings[name] === undefined) settings[name] = Array.isArray(fallback) ? [...fallback] : fallback
    }
    return settings as Static<Schema> & Defaulted<Schema>
  }
}

/** Gives a schema a default, keeping it in the type so that validated options are typed as set. */
export function withDefault<Schema extends TSchema, const Value extends Static<Schema>> (
  schema: Schema,
  value: Value
): Schema & { default: Value } {
  return Object.assign(schema, { default: value })
}

/** The options that have a default are never undefined once validated. */
export type Defaulted<Schema extends TObject> = {
  [Name in keyof Schema['properties'] as Schema['properties'][Name] extends { default: unknown } ? Name : never]-?:
  Exclude<Static<Schema>[Name & keyof Static<Schema>], undefined>
}

function describe (schema: TObject, label: string, errors: OptionError[]): string {
  const unknown = errors.find((error) => error.keyword === 'additionalProperties')
  if (unknown !== undefined) {
    const names = (unknown.params as { additionalProperties: string[] }).additionalProperties
    const where = unknown.instancePath === '' ? label : `${label} ${toName(unknown.instancePath)}`
    return `${where} has unknown option${names.length > 1 ? 's' : ''} ${names.map((name) => `'${name}'`).join(', ')}`
  }
  const first = errors.find((error) => error.instancePath !== '') ?? errors[0] as OptionError
  const name = toName(first.instancePath)
  if (errors.some((error) => error.keyword === 'anyOf' && error.instancePath === first.instancePath)) {
    const property = (schema.properties as TProperties)[name.split(/[.[]/)[0] as string]
    const description = (property as { description?: string } | undefined)?.description
    if (description !== undefined) return `${name} must be ${description}`
  }
  return `${name} ${first.message}`
}

function toName (instancePath: string): string {
  return instancePath.slice(1).split('/').map((part, index) =>
    /^\d+$/.test(part) ? `[${part}]` : index === 0 ? part : `.${part}`
  ).join('')
}

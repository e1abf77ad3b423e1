import type { Static, TObject, TSchema } from 'typebox'
import { Compile } from 'typebox/compile'
import { InvalidOptionError } from './errors.js'

interface OptionError {
  instancePath: string
  keyword: string
  message: string
  params: unknown
}

/** How a set of options is named in error messages. */
export interface OptionsLabel {
  /** The options as a whole: `plugin`, `MemoryStore`, `config.idempotency`. */
  subject: string
  /** Put before an option's name: `''`, or `config.idempotency.` for a route's options. */
  prefix: string
}

export type OptionsValidator<Schema extends TObject> =
  (value: unknown, context?: string) => Static<Schema> & Defaulted<Schema>

/**
 * Compiles an options schema into a function that checks a value, fills in the schema's
 * defaults and throws `InvalidOptionError` naming the first bad option and its rule
 * (after `context`, e.g. the route, when given). A property's `description`, where the schema
 * has one, states its rule better than the keyword that failed (a union, a pattern).
 */
export function compileOptions<Schema extends TObject> (schema: Schema, label: OptionsLabel): OptionsValidator<Schema> {
  const validator = Compile(schema)
  const defaults = Object.entries(schema.properties)
    .filter(([, property]) => 'default' in property)
    .map(([name, property]) => [name, (property as TSchema & { default: unknown }).default] as const)

  return function validate (value, context = '') {
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw new InvalidOptionError(`${context}${label.subject} options must be an object`)
    }
    if (!validator.Check(value)) {
      throw new InvalidOptionError(context + describe(schema, label, [...validator.Errors(value)] as OptionError[]))
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

function describe (schema: TObject, label: OptionsLabel, errors: OptionError[]): string {
  const unknown = errors.find((error) => error.keyword === 'additionalProperties')
  if (unknown !== undefined) {
    const names = (unknown.params as { additionalProperties: string[] }).additionalProperties
    const plural = names.length > 1 ? 's' : ''
    return `${label.subject} has unknown option${plural} ${names.map((name) => `'${name}'`).join(', ')}`
  }
  const first = errors.find((error) => error.instancePath !== '') as OptionError
  const name = label.prefix + toName(first.instancePath)
  const description = schemaAt(schema, first.instancePath)?.description
  return description === undefined ? `${name} ${first.message}` : `${name} must be ${description}`
}

function schemaAt (schema: TSchema, instancePath: string): { description?: string } | undefined {
  let current: (TSchema & { properties?: Record<string, TSchema>, items?: TSchema }) | undefined = schema
  for (const part of instancePath.slice(1).split('/')) {
    current = /^\d+$/.test(part) ? current?.items : current?.properties?.[part]
  }
  return current as { description?: string } | undefined
}

function toName (instancePath: string): string {
  return instancePath.slice(1).split('/').map((part, index) =>
    /^\d+$/.test(part) ? `[${part}]` : index === 0 ? part : `.${part}`
  ).join('')
}

import type { FastifyInstance, FastifyReply, FastifyRequest, HookHandlerDoneFunction, RouteOptions } from 'fastify'
import { requestChannel } from './diagnostics.js'
import { InvalidOptionError, KeyInvalidError, KeyMissingError, KeyMultipleError } from './errors.js'
import { countHeaderLines, parseKey } from './key.js'
import { validateRouteOptions, type FingerprintFunction, type IdempotencyRouteOptions, type PluginSettings, type ScopeFunction } from './options.js'
import { answeredAsProblem, kTracked, TrackedRequest, type PluginContext } from './request.js'
import type { TrackOptions } from './tracker.js'

/** The settings of one tracked route: the plugin's options with the route's overrides. */
export interface RouteSettings {
  /** The route's URL pattern, prefix included. */
  url: string
  /** The route's constraints as declared (host, version, custom strategies). */
  constraints: Record<string, unknown>
  required: boolean
  scope: ScopeFunction | undefined
  fingerprint: FingerprintFunction | undefined
  maxResponseSize: number
  /** ms a duplicate waits for the first request's outcome; 0: 409 at once. */
  wait: number
  track: TrackOptions
}

/** What the hooks of tracked routes share: the plugin's context and how to read the key header. */
export interface RouteContext extends PluginContext {
  settings: PluginSettings
  /** The header as it is written in messages: `Idempotency-Key`. */
  headerLabel: string
}

type TrackableRequest = FastifyRequest & { [kTracked]: TrackedRequest | null }

/**
 * The settings of a route that opts in (its `config.idempotency`, or `global`), or `undefined`
 * for one that does not; throws, naming the route, for a bad config. A route with several
 * methods is tracked for those in `methods` only: `onlyMethods` names them when it has others.
 */
export function routeSettings (settings: PluginSettings, route: RouteOptions): { route: RouteSettings, onlyMethods: Set<string> | undefined } | undefined {
  const config = route.config?.idempotency
  if (config === false || (config === undefined && !settings.global)) return undefined
  const where = `${String(route.method)} ${route.url}`
  if (config !== undefined && config !== true && (typeof config !== 'object' || config === null || Array.isArray(config))) {
    throw new InvalidOptionError(`route ${where}: config.idempotency must be a boolean or an object`)
  }
  const routeMethods = Array.isArray(route.method) ? route.method : [route.method]
  const methods = routeMethods.filter((method) => settings.methods.includes(method))
  if (methods.length === 0) {
    // Fastify copies a GET route's config to the HEAD route it adds: that HEAD did not opt in.
    if (config === undefined || (routeMethods.length === 1 && routeMethods[0] === 'HEAD')) return undefined
    throw new InvalidOptionError(`route ${where} opts in to idempotency, but none of its methods is in methods (${settings.methods.join(', ')})`)
  }
  const overrides: IdempotencyRouteOptions = typeof config === 'object' ? validateRouteOptions(config, `route ${where}: `) : {}
  const constraints = (route.constraints ?? {}) as Record<string, unknown>
  return {
    route: {
      url: route.url,
      constraints,
      required: overrides.required ?? settings.required,
      scope: overrides.scope ?? settings.scope,
      fingerprint: overrides.fingerprint ?? settings.fingerprint,
      maxResponseSize: overrides.maxResponseSize ?? settings.maxResponseSize,
      wait: overrides.wait ?? settings.wait,
      track: {
        cacheTtl: overrides.cacheTtl ?? settings.cacheTtl,
        processingTtl: overrides.processingTtl ?? settings.processingTtl,
        releaseOnError: overrides.releaseOnError ?? settings.releaseOnError
      }
    },
    onlyMethods: methods.length === routeMethods.length ? undefined : new Set(methods)
  }
}

/**
 * Makes a route tracked. Its key is checked in an onRequest hook (appended after the route's
 * own), before the body is read; tracking runs in the handler's place, after every hook of the
 * route, so that `scope` can read `request.user` and no hook can answer between tracking and the
 * handler. Requests without a key cost one onRequest call (and the plugin's onSend).
 */
export function trackRoute (route: RouteOptions, settings: RouteSettings, onlyMethods: Set<string> | undefined, context: RouteContext): void {
  const handler = route.handler
  route.handler = function trackedHandler (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply) {
    const tracked = (request as TrackableRequest)[kTracked]
    if (tracked === null) return handler.call(this, request, reply)
    return tracked.run(this, handler, request, reply)
  }
  route.onRequest = append(route.onRequest, function checkIdempotencyKey (request: FastifyRequest, reply: FastifyReply, next: HookHandlerDoneFunction) {
    if (onlyMethods !== undefined && !onlyMethods.has(request.method)) {
      next()
      return
    }
    const error = checkKey(request, settings, context)
    if (error === undefined) {
      next()
      return
    }
    if (requestChannel.hasSubscribers) {
      requestChannel.publish({ request, outcome: 'refused', route: settings.url, method: request.method, record: undefined, error })
    }
    if (!answeredAsProblem(context, request, reply, error)) next(error)
  })
  route.onError = append(route.onError, function noteIdempotencyError (request: FastifyRequest, reply: FastifyReply, error: Error, next: () => void) {
    ;(request as TrackableRequest)[kTracked]?.noteError(reply, error)
    next()
  })
}

// Sets the request's tracked state when its key is valid, or answers which error refuses it.
function checkKey (request: FastifyRequest, route: RouteSettings, context: RouteContext): Error | undefined {
  const { header, maxKeyLength } = context.settings
  const value = request.headers[header]
  if (value === undefined) return route.required ? new KeyMissingError(context.headerLabel) : undefined
  if (typeof value !== 'string' || (value.includes(',') && countHeaderLines(request.raw.rawHeaders, header) > 1)) {
    return new KeyMultipleError(context.headerLabel)
  }
  const key = parseKey(value, maxKeyLength)
  if (key === undefined) return new KeyInvalidError(context.headerLabel, maxKeyLength)
  request.idempotencyKey = key
  ;(request as TrackableRequest)[kTracked] = new TrackedRequest(context, route, key)
  return undefined
}

function append<Hook> (hooks: Hook | Hook[] | undefined, hook: Hook): Hook[] {
  if (hooks === undefined) return [hook]
  return Array.isArray(hooks) ? [...hooks, hook] : [hooks, hook]
}

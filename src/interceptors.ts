import { randomUUID } from "node:crypto";
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { Tracer } from "@opentelemetry/api";
import { callStatements, StatementScope, type StatementTrace, type WithCallStatements } from "./db/client.js";
import {
  codeName,
  type ErrorLogger,
  reasonOf,
  requestInfo,
  rpcError,
  toConnectError,
  withErrorDetails,
} from "./errors.js";
import type { Logger } from "./log.js";
import type { Metrics } from "./metrics.js";
import type { AccessControl } from "./security/access.js";
import { type CallSpan, endCallSpan, startCallSpan } from "./tracing.js";
import { rejectMalformed } from "./transport/malformed.js";

/**
 * Work that every call of every service needs, whatever protocol brought it:
 * wrapped around each method's handler where services are registered
 * (src/server.ts), so handlers hold only their own logic.
 */

type UnaryHandler = (request: unknown, context?: HandlerContext) => Promise<unknown>;
type StreamHandler = (request: unknown, context?: HandlerContext) => AsyncIterable<unknown>;

/** What the call wrapper needs. */
export interface CallObservers {
  /** Counts calls by method and status. */
  readonly metrics?: Metrics;
  /** Told the cause of every INTERNAL or UNAVAILABLE answer. */
  readonly logError?: ErrorLogger;
  /** Gets a line per failed call, and per call at debug level. */
  readonly logger?: Logger;
  /** Makes a span per call, and one per statement of a unary call (src/tracing.ts). */
  readonly tracer?: Tracer;
  /** Caps unary calls in flight; none when unset. */
  readonly admission?: CallAdmission;
  /** Mutual TLS's check of who may call what; every caller may call everything when unset. */
  readonly access?: AccessControl;
}

/** How long an overloaded process asks callers to wait before they try again. */
const overloadRetryMs = 100;

/**
 * A cap on unary calls in flight in this process: past it, calls are
 * answered RESOURCE_EXHAUSTED at once, so that an overload is a fast,
 * retryable answer instead of a queue that grows every caller's latency.
 */
export class CallAdmission {
  private inFlight = 0;

  constructor(readonly limit: number) {}

  /** True, and counted, when the call may run; call release() when it ends. */
  admit(): boolean {
    if (this.full) return false;
    this.inFlight++;
    return true;
  }

  release(): void {
    this.inFlight--;
  }

  /** Whether a call arriving now would be refused. */
  get full(): boolean {
    return this.inFlight >= this.limit;
  }
}

/** How a call refused by the cap is answered. */
export const overloaded = (limit: number) =>
  rpcError(Code.ResourceExhausted, `the service has ${limit} calls in flight, its limit: try again shortly`, {
    reason: "OVERLOADED",
    retryAfterMs: overloadRetryMs,
  });

// How loud a failed call's line is: the caller's mistake, a service that
// cannot serve now, or a fault.
const faults = new Set(["INTERNAL", "UNKNOWN", "DATA_LOSS"]);
const troubles = new Set(["UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"]);
const levelOf = (code: string) => (faults.has(code) ? "error" : troubles.has(code) ? "warn" : "info");

/** A caller's request id (x-request-id) when it is a plain token; otherwise one is made. */
const requestIdPattern = /^[\w.:-]{1,128}$/;
/** W3C trace context: version-traceid-parentid-flags. */
const traceparentPattern = /^[\da-f]{2}-([\da-f]{32})-([\da-f]{16})-[\da-f]{2}$/;

/**
 * One call being observed: its failure mapped to a status, its end counted,
 * logged and traced. A class: a call makes one object, not a closure per step.
 */
class CallObservation {
  private readonly started: number;
  /** The call's gRPC status code so far (connect's Code numbers are gRPC's; 0 is OK). */
  private status: Code | 0 = 0;
  private reason: string | undefined;
  private requestId: string | undefined;
  private readonly span: CallSpan | undefined;
  /** Where the call's statements report their spans, when tracing is on. */
  readonly trace: StatementTrace | undefined;

  constructor(
    private readonly method: DescMethod,
    private readonly observers: CallObservers,
    private readonly context: HandlerContext | undefined,
  ) {
    const timed = observers.metrics !== undefined || observers.logger !== undefined;
    this.started = timed ? performance.now() : 0;
    const tracer = observers.tracer;
    if (tracer) {
      this.span = startCallSpan(
        tracer,
        { service: method.parent.typeName, method: method.name, protocol: context?.protocolName },
        context?.requestHeader,
      );
      this.trace = { tracer, parent: this.span.context };
    }
  }

  private idOfRequest(): string {
    if (this.requestId === undefined) {
      const given = this.context?.requestHeader.get("x-request-id");
      this.requestId = given && requestIdPattern.test(given) ? given : randomUUID();
    }
    return this.requestId;
  }

  failed(err: unknown): ConnectError {
    const error = withErrorDetails(toConnectError(err, this.observers.logError));
    this.status = error.code;
    this.reason = reasonOf(error);
    // The caller learns the id its failure was logged under.
    return new ConnectError(
      error.rawMessage,
      error.code,
      error.metadata,
      [...error.details.filter((d) => "desc" in d), requestInfo(this.idOfRequest())],
      error.cause,
    );
  }

  /** The call ended early by the client's cancel or its deadline: counted so, never logged. */
  endedBy(context: HandlerContext | undefined): ConnectError | undefined {
    if (!context?.signal.aborted) return undefined;
    const reason = context.signal.reason;
    const error =
      reason instanceof ConnectError && (reason.code === Code.Canceled || reason.code === Code.DeadlineExceeded)
        ? reason
        : clientCancelled();
    this.status = error.code;
    return error;
  }

  ended(): void {
    if (this.span) endCallSpan(this.span, this.status, this.reason);
    const { metrics, logger } = this.observers;
    if (!metrics && !logger) return;
    const elapsedMs = performance.now() - this.started;
    metrics?.record(this.method, codeName(this.status), elapsedMs / 1000);
    if (logger) this.log(logger, elapsedMs);
  }

  private log(logger: Logger, elapsedMs: number): void {
    const code = codeName(this.status);
    const level = code === "OK" ? "debug" : levelOf(code);
    if (!logger.isLevelEnabled(level)) return;
    const headers = this.context?.requestHeader;
    const trace = traceparentPattern.exec(headers?.get("traceparent") ?? "");
    // All-zero ids are invalid (W3C): not a trace to follow.
    const traced = trace && !/^0+$/.test(trace[1] ?? "") && !/^0+$/.test(trace[2] ?? "") ? trace : undefined;
    logger[level](
      {
        rpc: { service: this.method.parent.typeName, method: this.method.name, protocol: this.context?.protocolName },
        code,
        reason: this.reason,
        duration_ms: Math.round(elapsedMs * 1000) / 1000,
        request_id: this.idOfRequest(),
        trace_id: traced?.[1],
        span_id: traced?.[2],
      },
      code === "OK" ? "call" : "call failed",
    );
  }
}

/** Told when a call ends early (deadline, cancel): see onCallEnd. */
export interface CallEndListener {
  callEnded(reason: unknown): void;
}

/**
 * A handler context that tells when its call ends early (deadline, cancel)
 * without an AbortSignal: the grpc-js transport's (src/transport/grpc.ts).
 */
export const onCallEnd = Symbol("onCallEnd");
interface CallEndSource {
  [onCallEnd](listener: CallEndListener): void;
}

/**
 * How close to its deadline a cancelled call counts as ended by it. The
 * server's deadline starts when it reads the request, the client's when it
 * sends it: on a new connection, the client's timer can fire tens of
 * milliseconds before the server's.
 */
const deadlineSlackMs = 100;

/** How a call that its deadline ended is answered, whichever transport saw the deadline pass. */
export const deadlinePassed = () =>
  new ConnectError("the deadline passed before the call finished", Code.DeadlineExceeded);
/** How a call that its client cancelled is answered. */
export const clientCancelled = () => new ConnectError("the client cancelled the call", Code.Canceled);

/**
 * A call's work, settled by the call's end when that comes first (the
 * deadline passed, or the client cancelled): the call ends then, with
 * DEADLINE_EXCEEDED or CANCELLED, and every statement the work started
 * through the call's sql (sqlForCall, the store's forCall) is cancelled;
 * what the work does after that is ignored. What a call leaves running on
 * purpose goes through the pool's own sql (unscopedSql), tied to no call.
 *
 * A class that is its own listener (onCallEnd's, or the signal's through
 * handleEvent): it runs on every call, and closures cost more here (the
 * TypeScript loader names each one it makes).
 */
class WorkUntilCallEnds<T> {
  private settled = false;
  private resolve: ((value: T) => void) | undefined;
  private reject: ((reason: unknown) => void) | undefined;
  private signal: AbortSignal | undefined;
  private readonly statements: StatementScope;

  constructor(
    private readonly context: HandlerContext & WithCallStatements,
    trace: StatementTrace | undefined,
  ) {
    this.statements = new StatementScope(trace);
  }

  run(work: () => Promise<T>): Promise<T> {
    const context = this.context;
    const settles = new Promise<T>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // The grpc-js context tells its end without an AbortSignal (cheaper);
    // connect-es's has only the signal.
    const tell = (context as Partial<CallEndSource>)[onCallEnd];
    if (tell) tell.call(context, this);
    else {
      const signal = context.signal;
      this.signal = signal;
      if (signal.aborted) this.callEnded(signal.reason);
      else signal.addEventListener("abort", this);
    }
    if (this.settled) return settles;
    context[callStatements] = this.statements;
    try {
      work().then(
        (value) => this.finished(value, undefined, false),
        (err: unknown) => this.finished(undefined, err, true),
      );
    } catch (err) {
      // A handler that throws rather than rejecting: settled the same way,
      // and its signal listener taken off.
      this.finished(undefined, err, true);
    }
    return settles;
  }

  /** The signal aborted (EventTarget calls an object listener's handleEvent). */
  handleEvent(): void {
    this.callEnded(this.signal?.reason);
  }

  callEnded(reason: unknown): void {
    if (this.settled) return;
    this.settled = true;
    // The client gives up at its deadline too, and its cancel can arrive
    // first: a call whose deadline has passed ended by the deadline.
    const why = (this.context.timeoutMs() ?? Number.POSITIVE_INFINITY) <= deadlineSlackMs ? deadlinePassed() : reason;
    this.statements.abort(why);
    this.reject?.(why);
  }

  private finished(value: T | undefined, err: unknown, failed: boolean): void {
    if (this.settled) return;
    this.settled = true;
    this.signal?.removeEventListener("abort", this);
    if (failed) this.reject?.(err);
    else this.resolve?.(value as T);
  }
}

function wrapUnary(method: DescMethod, handler: UnaryHandler, observers: CallObservers): UnaryHandler {
  const admission = observers.admission;
  return async (request, context) => {
    const call = new CallObservation(method, observers, context);
    const admitted = admission?.admit() ?? true;
    try {
      if (!admitted) throw overloaded(admission?.limit ?? 0);
      observers.access?.check(method, context, request);
      rejectMalformed(request, method.input.typeName);
      if (!context) return await handler(request, context);
      return await new WorkUntilCallEnds(context, call.trace).run(() => handler(request, context));
    } catch (err) {
      throw call.failed(err);
    } finally {
      if (admitted) admission?.release();
      call.ended();
    }
  };
}

function wrapStream(method: DescMethod, handler: StreamHandler, observers: CallObservers): StreamHandler {
  return async function* (request, context) {
    const call = new CallObservation(method, observers, context);
    try {
      const access = observers.access;
      access?.check(method, context, request);
      rejectMalformed(request, method.input.typeName);
      if (!access) {
        yield* handler(request, context);
        return;
      }
      // A stream outlives policies: after a reload, its caller is checked
      // again before its next message (a PROGRESS marker at the latest),
      // and one the new policy denies ends PERMISSION_DENIED.
      let checked = access.generation;
      for await (const message of handler(request, context)) {
        if (access.generation !== checked) {
          checked = access.generation;
          access.check(method, context, request);
        }
        yield message;
      }
    } catch (err) {
      // A stream the client left fails in whatever way writing to it
      // failed: that is its cancel, not a fault.
      throw call.endedBy(context) ?? call.failed(err);
    } finally {
      // Also when the transport stops reading it because the client left.
      call.endedBy(context);
      call.ended();
    }
  };
}

/**
 * `impl` with every method wrapped: whatever escapes a handler becomes the
 * ConnectError the caller sees (src/errors.ts, the one mapping), and every
 * call is counted with its status.
 */
export function observeCalls<S extends DescService>(
  service: S,
  impl: Partial<ServiceImpl<S>>,
  observers: CallObservers,
): Partial<ServiceImpl<S>> {
  const wrapped: Record<string, unknown> = {};
  for (const method of service.methods) {
    const handler = (impl as Record<string, unknown>)[method.localName];
    if (typeof handler !== "function") continue;
    wrapped[method.localName] =
      method.methodKind === "unary"
        ? wrapUnary(method, handler as UnaryHandler, observers)
        : wrapStream(method, handler as StreamHandler, observers);
  }
  return wrapped as Partial<ServiceImpl<S>>;
}

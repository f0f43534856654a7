import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { cancellingStatements, StatementScope } from "./db/client.js";
import { codeName, type ErrorLogger, toConnectError } from "./errors.js";
import type { Metrics } from "./metrics.js";
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
}

/** One call being observed: its failure mapped to a status, its end counted. */
function observe(method: DescMethod, observers: CallObservers) {
  const started = observers.metrics ? performance.now() : 0;
  let code = "OK";
  return {
    failed(err: unknown): ConnectError {
      const error = toConnectError(err, observers.logError);
      code = codeName(error.code);
      return error;
    },
    /** The call ended early by the client's cancel or its deadline: counted so, never logged. */
    endedBy(context: HandlerContext | undefined): ConnectError | undefined {
      if (!context?.signal.aborted) return undefined;
      const reason = context.signal.reason;
      const error =
        reason instanceof ConnectError && (reason.code === Code.Canceled || reason.code === Code.DeadlineExceeded)
          ? reason
          : new ConnectError("the client cancelled the call", Code.Canceled);
      code = codeName(error.code);
      return error;
    },
    ended(): void {
      observers.metrics?.record(method.name, code, (performance.now() - started) / 1000);
    },
  };
}

/**
 * A handler context that tells when its call ends early (deadline, cancel)
 * without an AbortSignal: the grpc-js transport's (src/transport/grpc.ts).
 */
export const onCallEnd = Symbol("onCallEnd");
interface CallEndSource {
  [onCallEnd](listener: (reason: unknown) => void): void;
}

/**
 * How close to its deadline a cancelled call counts as ended by it. The
 * server's deadline starts when it reads the request, the client's when it
 * sends it: on a new connection, the client's timer can fire tens of
 * milliseconds before the server's.
 */
const deadlineSlackMs = 100;

const deadlinePassed = () => new ConnectError("the deadline passed before the call finished", Code.DeadlineExceeded);

/**
 * `work`, but settled by the call's signal when it aborts first (the
 * deadline passed, or the client cancelled): the call ends then, with
 * DEADLINE_EXCEEDED or CANCELLED, and every statement `work` started is
 * cancelled (cancellingStatements); what `work` does after that is ignored.
 * The statements are tied to the call only while `work` runs, so a call
 * that has ended cancels nothing it left behind on purpose.
 */
function untilAborted<T>(context: HandlerContext, work: () => Promise<T>): Promise<T> {
  // The client gives up at its deadline too, and its cancel can arrive
  // first: a call whose deadline has passed ended by the deadline.
  const reasonFor = (reason: unknown) =>
    (context.timeoutMs() ?? Number.POSITIVE_INFINITY) <= deadlineSlackMs ? deadlinePassed() : reason;
  const statements = new StatementScope();
  return new Promise<T>((resolve, reject) => {
    let settled = false;
    const aborted = (reason: unknown) => {
      if (settled) return;
      settled = true;
      const why = reasonFor(reason);
      statements.abort(why);
      reject(why);
    };
    // The grpc-js context tells its end without an AbortSignal (cheaper);
    // connect-es's has only the signal.
    const tell = (context as Partial<CallEndSource>)[onCallEnd];
    let stopListening = () => {};
    if (tell) tell.call(context, aborted);
    else {
      const signal = context.signal;
      const listener = () => aborted(signal.reason);
      if (signal.aborted) listener();
      else signal.addEventListener("abort", listener);
      stopListening = () => signal.removeEventListener("abort", listener);
    }
    if (settled) return;
    cancellingStatements(statements, work).then(
      (value) => {
        settled = true;
        stopListening();
        resolve(value);
      },
      (err: unknown) => {
        settled = true;
        stopListening();
        reject(err);
      },
    );
  });
}

function wrapUnary(method: DescMethod, handler: UnaryHandler, observers: CallObservers): UnaryHandler {
  return async (request, context) => {
    const call = observe(method, observers);
    try {
      rejectMalformed(request, method.input.typeName);
      if (!context) return await handler(request, context);
      return await untilAborted(context, () => handler(request, context));
    } catch (err) {
      throw call.failed(err);
    } finally {
      call.ended();
    }
  };
}

function wrapStream(method: DescMethod, handler: StreamHandler, observers: CallObservers): StreamHandler {
  return async function* (request, context) {
    const call = observe(method, observers);
    try {
      rejectMalformed(request, method.input.typeName);
      yield* handler(request, context);
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

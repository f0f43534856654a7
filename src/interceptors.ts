import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import { cancellingStatements } from "./db/client.js";
import { type ErrorLogger, toConnectError } from "./errors.js";
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

// "InvalidArgument" → "INVALID_ARGUMENT", the names gRPC tooling shows.
const codeNames = new Map(
  Object.entries(Code)
    .filter(([, v]) => typeof v === "number")
    .map(([name, v]) => [v as Code, name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase()]),
);
codeNames.set(Code.Canceled, "CANCELLED"); // gRPC's spelling

/** The gRPC name of a status code, e.g. "NOT_FOUND". */
export function codeName(code: Code): string {
  return codeNames.get(code) ?? String(code);
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
    ended(): void {
      observers.metrics?.record(method.name, code, (performance.now() - started) / 1000);
    },
  };
}

/** How close to its deadline a cancelled call counts as ended by it. */
const deadlineSlackMs = 20;

const deadlinePassed = () => new ConnectError("the deadline passed before the call finished", Code.DeadlineExceeded);

/**
 * `work`, but settled by the call's signal when it aborts first (the
 * deadline passed, or the client cancelled): the call ends then, with
 * DEADLINE_EXCEEDED or CANCELLED, and every statement `work` started is
 * cancelled (cancellingStatements); what `work` does after that is ignored.
 * The statements' signal follows the call's only while `work` runs, so a
 * call that has ended cancels nothing it left behind on purpose.
 */
async function untilAborted<T>(context: HandlerContext, work: () => Promise<T>): Promise<T> {
  const signal = context.signal;
  const statements = new AbortController();
  let done = () => {};
  const aborted = new Promise<never>((_, reject) => {
    const forward = () => {
      // The client gives up at its deadline too, and its cancel can arrive
      // first: a call whose deadline has passed ended by the deadline.
      const reason =
        (context.timeoutMs() ?? Number.POSITIVE_INFINITY) <= deadlineSlackMs ? deadlinePassed() : signal.reason;
      statements.abort(reason);
      reject(reason);
    };
    if (signal.aborted) forward();
    else signal.addEventListener("abort", forward, { once: true });
    done = () => signal.removeEventListener("abort", forward);
  });
  const running = cancellingStatements(statements.signal, work);
  running.catch(() => {}); // settled after the call ended: nobody is waiting
  try {
    return await Promise.race([running, aborted]);
  } finally {
    done();
  }
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
      throw call.failed(err);
    } finally {
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

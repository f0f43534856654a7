import { Code } from "@connectrpc/connect";
import {
  type Context,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  type TextMapGetter,
  type Tracer,
  trace,
} from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { codeName } from "./errors.js";

/**
 * OpenTelemetry tracing, off unless configured: with
 * OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set,
 * every rpc is a server span, a child of the caller's W3C `traceparent` on
 * any protocol, with a client span per SQL statement it runs (its text, with
 * $n placeholders: never a value). Spans go out over OTLP (HTTP/protobuf;
 * the exporter reads the standard OTEL_EXPORTER_OTLP_* variables). Off, the
 * request path does not touch any of it.
 */

/** The service's tracing, when it is on. */
export interface Tracing {
  readonly tracer: Tracer;
  /** Sends what is buffered (for up to 2 s) and stops. */
  shutdown(): Promise<void>;
}

type Env = Readonly<Record<string, string | undefined>>;

/**
 * Tracing as the environment configures it, or undefined when it is off.
 * The SDK and the exporter are loaded only then.
 */
export async function tracingFromEnv(env: Env = process.env): Promise<Tracing | undefined> {
  if (env.OTEL_SDK_DISABLED === "true") return undefined;
  const base = env.OTEL_EXPORTER_OTLP_ENDPOINT;
  // The signal's own endpoint is used as it is; the base one gets the traces path.
  const url = env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT || (base ? `${base.replace(/\/+$/, "")}/v1/traces` : undefined);
  if (!url) return undefined;
  const [{ OTLPTraceExporter }, { resourceFromAttributes }, { BatchSpanProcessor, BasicTracerProvider }] =
    await Promise.all([
      import("@opentelemetry/exporter-trace-otlp-proto"),
      import("@opentelemetry/resources"),
      import("@opentelemetry/sdk-trace-base"),
    ]);
  const provider = new BasicTracerProvider({
    resource: resourceFromAttributes({ "service.name": env.OTEL_SERVICE_NAME || "keys-driver-service" }),
    spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({ url }))],
  });
  return {
    tracer: provider.getTracer("keys-driver-service"),
    // A collector that is down must not hold up the process's stop.
    shutdown: () =>
      Promise.race([provider.shutdown(), new Promise<void>((resolve) => setTimeout(resolve, 2000).unref())]),
  };
}

const propagator = new W3CTraceContextPropagator();
const fromHeaders: TextMapGetter<Headers> = {
  get: (headers, key) => headers.get(key) ?? undefined,
  keys: (headers) => [...headers.keys()],
};

// Status codes that make a server span an error (OpenTelemetry's rules for
// gRPC servers): the caller's mistakes (INVALID_ARGUMENT, NOT_FOUND...) do not.
const serverFaults = new Set<number>([
  Code.Unknown,
  Code.DeadlineExceeded,
  Code.Unimplemented,
  Code.Internal,
  Code.Unavailable,
  Code.DataLoss,
]);

/** One rpc's span, and the context its statements' spans are children of. */
export interface CallSpan {
  readonly span: Span;
  readonly context: Context;
}

/** Starts the server span of a call, under the caller's traceparent if it sent one. */
export function startCallSpan(
  tracer: Tracer,
  rpc: { service: string; method: string; protocol: string | undefined },
  requestHeader: Headers | undefined,
): CallSpan {
  const parent = requestHeader ? propagator.extract(ROOT_CONTEXT, requestHeader, fromHeaders) : ROOT_CONTEXT;
  const span = tracer.startSpan(
    `${rpc.service}/${rpc.method}`,
    {
      kind: SpanKind.SERVER,
      attributes: {
        "rpc.system": rpc.protocol === "grpc" ? "grpc" : "connect_rpc",
        "rpc.service": rpc.service,
        "rpc.method": rpc.method,
        ...(rpc.protocol ? { "keysdriver.protocol": rpc.protocol } : {}),
      },
    },
    parent,
  );
  return { span, context: trace.setSpan(parent, span) };
}

/** Ends a call's span with its status (the gRPC code, 0 for OK) and error reason. */
export function endCallSpan(call: CallSpan, status: number, reason: string | undefined): void {
  call.span.setAttribute("rpc.grpc.status_code", status);
  if (reason) call.span.setAttribute("error.type", reason);
  if (serverFaults.has(status)) call.span.setStatus({ code: SpanStatusCode.ERROR, message: codeName(status) });
  call.span.end();
}

/** Starts the span of one SQL statement of a call; `end` it with the statement's text once it settled. */
export function startStatementSpan(tracer: Tracer, parent: Context): Span {
  return tracer.startSpan(
    "postgresql",
    { kind: SpanKind.CLIENT, attributes: { "db.system.name": "postgresql" } },
    parent,
  );
}

/** Ends a statement's span: its text once postgres.js built it ($n placeholders, no values), and its failure. */
export function endStatementSpan(span: Span, text: unknown, error?: unknown): void {
  if (typeof text === "string") {
    span.setAttribute("db.query.text", text);
    span.updateName(text.trimStart().split(/\s/, 1)[0]?.toUpperCase() || "postgresql");
  }
  if (error !== undefined) {
    const code = typeof error === "object" && error !== null && "code" in error ? String(error.code) : "error";
    span.setAttribute("error.type", code);
    span.setStatus({ code: SpanStatusCode.ERROR, message: code });
  }
  span.end();
}

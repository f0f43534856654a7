import type { DescMessage, MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RequestInfoSchema,
  RetryInfoSchema,
} from "../gen/google/rpc/error_details_pb.js";

/**
 * Every error this service sends carries google.rpc error details a program
 * can act on (docs/ERRORS.md): an ErrorInfo whose `reason` says what
 * happened, in this domain; a BadRequest naming the field for
 * INVALID_ARGUMENT; a RetryInfo saying when to try again for UNAVAILABLE and
 * for RESOURCE_EXHAUSTED caused by load.
 */
export const errorDomain = "keysdriver.v1";

/** A detail as connect-es sends it: a message schema and the message's fields. */
interface Detail<D extends DescMessage = DescMessage> {
  desc: D;
  value: MessageInitShape<D>;
}

const detail = <D extends DescMessage>(desc: D, value: MessageInitShape<D>): Detail => ({ desc, value }) as Detail;

/** What an error says beyond its code and message. */
export interface ErrorDetails {
  /** ErrorInfo.reason: UPPER_SNAKE_CASE, stable, documented in docs/ERRORS.md. */
  readonly reason: string;
  /** ErrorInfo.metadata: never a value the caller sent, never data. */
  readonly metadata?: Readonly<Record<string, string>>;
  /** RetryInfo.retry_delay. */
  readonly retryAfterMs?: number;
  /** BadRequest.field_violations. */
  readonly violations?: readonly { readonly field: string; readonly description: string }[];
}

/** An error with its details, ready to be sent on any protocol. */
export function rpcError(code: Code, message: string, details: ErrorDetails): ConnectError {
  const out: Detail[] = [];
  if (details.violations?.length) {
    out.push(detail(BadRequestSchema, { fieldViolations: details.violations.map((v) => ({ ...v })) }));
  }
  out.push(detail(ErrorInfoSchema, { reason: details.reason, domain: errorDomain, metadata: { ...details.metadata } }));
  if (details.retryAfterMs !== undefined) out.push(retryInfo(details.retryAfterMs));
  return new ConnectError(message, code, undefined, out);
}

function retryInfo(ms: number): Detail {
  const seconds = Math.floor(ms / 1000);
  return detail(RetryInfoSchema, {
    retryDelay: { seconds: BigInt(seconds), nanos: Math.round(ms - seconds * 1000) * 1_000_000 },
  });
}

/** The detail that tells a caller the id its failed call was logged under. */
export function requestInfo(requestId: string): Detail {
  return detail(RequestInfoSchema, { requestId });
}

/** The ErrorInfo reason of an error made here, if it has one. */
export function reasonOf(error: ConnectError): string | undefined {
  for (const d of error.details) {
    if ("desc" in d && d.desc.typeName === ErrorInfoSchema.typeName) return (d.value as { reason?: string }).reason;
  }
  return undefined;
}

/** Something a caller can act on was not found, e.g. reason KEY_NOT_FOUND. */
export function notFound(what: string): ConnectError {
  return rpcError(Code.NotFound, `${what} not found`, {
    reason: `${what.toUpperCase().replace(/\W+/g, "_")}_NOT_FOUND`,
  });
}

/**
 * The request is malformed; the message and a BadRequest name the field
 * (its path in the request, as in the .proto; "" for the whole body).
 */
export function invalidArgument(field: string, problem: string, reason = "INVALID_FIELD"): ConnectError {
  return rpcError(Code.InvalidArgument, field === "" ? problem : `${field}: ${problem}`, {
    reason,
    metadata: field === "" ? undefined : { field },
    violations: [{ field, description: problem }],
  });
}

// "InvalidArgument" → "INVALID_ARGUMENT", the names gRPC tooling shows.
const codeNames = new Map<number, string>(
  Object.entries(Code)
    .filter(([, v]) => typeof v === "number")
    .map(([name, v]) => [v as number, name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase()]),
);
codeNames.set(Code.Canceled, "CANCELLED"); // gRPC's spelling
codeNames.set(0, "OK"); // a status, not an error code: connect's Code has no 0

/** The gRPC name of a status code, e.g. "NOT_FOUND" ("OK" for 0). */
export function codeName(code: Code | 0): string {
  return codeNames.get(code) ?? String(code);
}

/** How long a caller should wait before retrying when nothing more precise is known. */
const defaultRetryAfterMs = 1000;

// The transports' own words for a message over the size limit (grpc-js,
// connect-es): retrying the same message can never succeed, so no RetryInfo.
const tooLarge = /larger than/;

const typeOf = (d: ConnectError["details"][number]) => ("desc" in d ? d.desc.typeName : d.type);

/**
 * `error` with the details every error carries added where missing: the
 * ErrorInfo (reason = the code's name unless the error was made with one)
 * and, for UNAVAILABLE and RESOURCE_EXHAUSTED, a RetryInfo. For errors the
 * transports raise themselves (size limits, unknown methods, deadlines), and
 * applied to every error as it is sent (src/transport).
 */
export function withErrorDetails(error: ConnectError): ConnectError {
  const types = new Set(error.details.map(typeOf));
  const added: Detail[] = [];
  const oversize = error.code === Code.ResourceExhausted && tooLarge.test(error.rawMessage);
  if (!types.has(ErrorInfoSchema.typeName)) {
    const reason = oversize ? "MESSAGE_TOO_LARGE" : codeName(error.code);
    added.push(detail(ErrorInfoSchema, { reason, domain: errorDomain }));
  }
  if (error.code === Code.InvalidArgument && !types.has(BadRequestSchema.typeName)) {
    // A transport's own INVALID_ARGUMENT (a bad timeout header, a body it cannot decompress): no field to name.
    added.unshift(detail(BadRequestSchema, { fieldViolations: [{ field: "", description: error.rawMessage }] }));
  }
  const retryable = error.code === Code.Unavailable || (error.code === Code.ResourceExhausted && !oversize);
  if (retryable && !types.has(RetryInfoSchema.typeName)) added.push(retryInfo(defaultRetryAfterMs));
  if (added.length === 0) return error;
  // Only this process's own errors reach here: every detail has its schema.
  const own = error.details.filter((d): d is Detail => "desc" in d);
  return new ConnectError(error.rawMessage, error.code, error.metadata, [...own, ...added], error.cause);
}

// connect-es sends errors through functions src/transport/connect-fixes.js
// patches to call this first: the errors it raises itself get details too.
(globalThis as Record<symbol, unknown>)[Symbol.for("keys-driver-service.error-details")] = withErrorDetails;

// SQLSTATE classes and codes that mean "the database is not there right now"
// (retry with backoff) rather than "the request was wrong".
const unavailableStates = new Set(["53300", "57P01", "57P02", "57P03", "55006"]);
const unavailableErrnos = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "ENOTFOUND",
  "EAI_AGAIN",
  "CONNECT_TIMEOUT",
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
]);

function errorCode(err: unknown): string | undefined {
  if (typeof err === "object" && err !== null && "code" in err) {
    const code = (err as { code: unknown }).code;
    return typeof code === "string" ? code : undefined;
  }
  return undefined;
}

/** How to report an internal failure; the default writes to stderr. */
export type ErrorLogger = (message: string, cause: unknown) => void;

const logToStderr: ErrorLogger = (message, cause) => {
  console.error(message, cause);
};

/**
 * Turns whatever escaped a handler into the ConnectError the caller sees.
 * Errors the handlers raised on purpose pass through; database trouble
 * becomes UNAVAILABLE, DEADLINE_EXCEEDED or ABORTED; anything else is
 * INTERNAL with the cause logged here and never sent (no SQL, no stack, no
 * data).
 */
export function toConnectError(err: unknown, log: ErrorLogger = logToStderr): ConnectError {
  if (err instanceof ConnectError) return err;
  // The call's signal aborted (the client cancelled, or went away): not a fault.
  if (err instanceof Error && err.name === "AbortError")
    return rpcError(Code.Canceled, "the call was cancelled", { reason: "CANCELLED" });
  const code = errorCode(err);
  if (code !== undefined) {
    if (code === "57014")
      return rpcError(Code.DeadlineExceeded, "the database cancelled the statement (timeout)", {
        reason: "STATEMENT_TIMEOUT",
      });
    if (code === "40001" || code === "40P01")
      return rpcError(Code.Aborted, "concurrent update; retry", { reason: "CONCURRENT_UPDATE" });
    if (code.startsWith("08") || unavailableStates.has(code) || unavailableErrnos.has(code)) {
      log("database unavailable", err);
      return rpcError(Code.Unavailable, "database unavailable", {
        reason: "DATABASE_UNAVAILABLE",
        retryAfterMs: defaultRetryAfterMs,
      });
    }
  }
  log("internal error", err);
  return rpcError(Code.Internal, "internal error", { reason: "INTERNAL" });
}

import { Code, ConnectError } from "@connectrpc/connect";

/** Something a caller can act on was not found. */
export function notFound(what: string): ConnectError {
  return new ConnectError(`${what} not found`, Code.NotFound);
}

/** The request is malformed; the message names the field. */
export function invalidArgument(field: string, problem: string): ConnectError {
  return new ConnectError(`${field}: ${problem}`, Code.InvalidArgument);
}

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
    return new ConnectError("the call was cancelled", Code.Canceled);
  const code = errorCode(err);
  if (code !== undefined) {
    if (code === "57014")
      return new ConnectError("the database cancelled the statement (timeout)", Code.DeadlineExceeded);
    if (code === "40001" || code === "40P01") return new ConnectError("concurrent update; retry", Code.Aborted);
    if (code.startsWith("08") || unavailableStates.has(code) || unavailableErrnos.has(code)) {
      log("database unavailable", err);
      return new ConnectError("database unavailable", Code.Unavailable);
    }
  }
  log("internal error", err);
  return new ConnectError("internal error", Code.Internal);
}

import { invalidArgument } from "../errors.js";

/**
 * A request body that could not be decoded reaches the handler as this
 * marker, from either server (grpc-js's deserializer in ./grpc.ts, or
 * connect-es's parse as ./connect-fixes.js changes it), so that the wrapper
 * around every handler answers it, and counts it, in one place.
 */
const malformedKey = Symbol.for("keys-driver-service.malformed-request");

/** The marker for a body that failed to decode with `problem`. */
export function malformedRequest(problem: string): object {
  return { [malformedKey]: problem };
}

/** INVALID_ARGUMENT if `request` is the marker of an undecodable body. */
export function rejectMalformed(request: unknown, typeName: string): void {
  if (typeof request === "object" && request !== null && malformedKey in request) {
    const problem = String((request as Record<symbol, unknown>)[malformedKey]);
    throw invalidArgument("", `the request body is not a valid ${typeName} message (${problem})`, "MALFORMED_REQUEST");
  }
}

/** Throws unless connect-es was loaded with ./connect-fixes.js applied. */
export function assertConnectFixed(): void {
  const patched = (globalThis as Record<symbol, Set<string> | undefined>)[
    Symbol.for("keys-driver-service.connect-fixes")
  ];
  if (!["serialization.js", "error-json.js", "trailer-status.js"].every((name) => patched?.has(name))) {
    throw new Error(
      "@connectrpc/connect was loaded without the fixes in src/transport/connect-fixes.js: " +
        "start node with --import ./src/preload.js (as npm start does)",
    );
  }
}

// A module load hook (node:module register, from src/preload.js) that
// changes one thing in @connectrpc/connect 2.x as it is loaded, in its
// protocol/serialization.js: a request body the server cannot decode (a
// malformed protobuf message, invalid UTF-8 in a string, a wrong wire type,
// JSON of the wrong shape) no longer fails the call before the service sees
// it. connect-es answers INTERNAL for such a binary body (and a JSON one
// INVALID_ARGUMENT, uncounted): the caller's mistake reported as the
// server's fault. With this hook the server's parse of a request hands the
// handler a marker instead (see ./malformed.ts), which the wrapper around
// every handler (src/interceptors.ts) answers with INVALID_ARGUMENT and
// counts, exactly as for a gRPC call that grpc-js could not decode.
// Only the server's request parsing changes: clients and responses are
// untouched, and size limits still apply first.
//
// The hook fails loudly when the text it patches has changed (a new
// connect-es release): check the new behaviour, then update or drop it.
//
// Plain JavaScript: hooks run on their own thread, before any TypeScript
// loader can be relied upon.

const patchedModule = /\/node_modules\/@connectrpc\/connect\/dist\/esm\/protocol\/serialization\.js$/;

const find =
  "    const inputBinary = limitSerialization(createBinarySerialization(method.input, binaryOptions), limitOptions);\n" +
  "    const inputJson = limitSerialization(createJsonSerialization(method.input, jsonOptions), limitOptions);\n";

const replace =
  "    const inputBinary = limitSerialization(markMalformed(createBinarySerialization(method.input, binaryOptions)), limitOptions);\n" +
  "    const inputJson = limitSerialization(markMalformed(createJsonSerialization(method.input, jsonOptions)), limitOptions);\n";

// The marker's key is shared with src/transport/malformed.ts through the global symbol registry.
const helper = `
function markMalformed(serialization) {
  return {
    serialize: serialization.serialize,
    parse(data) {
      try {
        return serialization.parse(data);
      } catch (e) {
        const problem = e instanceof Error ? e.message : String(e);
        return { [Symbol.for("keys-driver-service.malformed-request")]: problem };
      }
    },
  };
}
(globalThis[Symbol.for("keys-driver-service.connect-fixes")] ??= new Set()).add("serialization.js");
`;

/** @type {import("node:module").LoadHook} */
export async function load(url, context, nextLoad) {
  const loaded = await nextLoad(url, context);
  if (!url.startsWith("file:") || !patchedModule.test(new URL(url).pathname)) return loaded;
  const source = typeof loaded.source === "string" ? loaded.source : new TextDecoder().decode(loaded.source);
  const at = source.indexOf(find);
  if (at < 0 || source.indexOf(find, at + 1) >= 0) {
    throw new Error(
      `@connectrpc/connect changed: ${url} no longer has the request parsing src/transport/connect-fixes.js patches. ` +
        "See what it now answers for a malformed request body, then update or delete the patch.",
    );
  }
  return { ...loaded, source: source.slice(0, at) + replace + source.slice(at + find.length) + helper };
}

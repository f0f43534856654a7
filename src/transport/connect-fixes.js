// A module load hook (node:module register, from src/preload.js) that
// changes two things in @connectrpc/connect 2.x as it is loaded.
//
// 1. In its protocol/serialization.js: a request body the server cannot decode (a
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
// 2. In protocol-connect/error-json.js and protocol-grpc/trailer-status.js,
// where every error a Connect, gRPC or gRPC-Web handler sends is written:
// the error first goes through withErrorDetails (src/errors.ts), so the
// errors connect-es raises itself (size limits, bad timeouts, unsupported
// compression) carry the google.rpc details every error of this service
// carries.
//
// The hook fails loudly when the text it patches has changed (a new
// connect-es release): check the new behaviour, then update or drop it.
//
// Plain JavaScript: hooks run on their own thread, before any TypeScript
// loader can be relied upon.

const registered = (name) =>
  `\n(globalThis[Symbol.for("keys-driver-service.connect-fixes")] ??= new Set()).add(${JSON.stringify(name)});\n`;

// Shared with src/errors.ts through the global symbol registry.
const enrich = (variable) =>
  `    ${variable} = globalThis[Symbol.for("keys-driver-service.error-details")]?.(${variable}) ?? ${variable};\n`;

const patches = [
  {
    module: /\/node_modules\/@connectrpc\/connect\/dist\/esm\/protocol\/serialization\.js$/,
    name: "serialization.js",
    find:
      "    const inputBinary = limitSerialization(createBinarySerialization(method.input, binaryOptions), limitOptions);\n" +
      "    const inputJson = limitSerialization(createJsonSerialization(method.input, jsonOptions), limitOptions);\n",
    replace:
      "    const inputBinary = limitSerialization(markMalformed(createBinarySerialization(method.input, binaryOptions)), limitOptions);\n" +
      "    const inputJson = limitSerialization(markMalformed(createJsonSerialization(method.input, jsonOptions)), limitOptions);\n",
    // The marker's key is shared with src/transport/malformed.ts through the global symbol registry.
    helper: `
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
`,
  },
  {
    module: /\/node_modules\/@connectrpc\/connect\/dist\/esm\/protocol-connect\/error-json\.js$/,
    name: "error-json.js",
    find: "export function errorToJson(error, jsonWriteOptions) {\n",
    replace: `export function errorToJson(error, jsonWriteOptions) {\n${enrich("error")}`,
    helper: "",
  },
  {
    module: /\/node_modules\/@connectrpc\/connect\/dist\/esm\/protocol-grpc\/trailer-status\.js$/,
    name: "trailer-status.js",
    find: "export function setTrailerStatus(target, error) {\n    if (error) {\n",
    replace: `export function setTrailerStatus(target, error) {\n    if (error) {\n${enrich("error")}`,
    helper: "",
  },
];

/** @type {import("node:module").LoadHook} */
export async function load(url, context, nextLoad) {
  const loaded = await nextLoad(url, context);
  if (!url.startsWith("file:")) return loaded;
  const pathname = new URL(url).pathname;
  const patch = patches.find((p) => p.module.test(pathname));
  if (!patch) return loaded;
  const source = typeof loaded.source === "string" ? loaded.source : new TextDecoder().decode(loaded.source);
  const at = source.indexOf(patch.find);
  if (at < 0 || source.indexOf(patch.find, at + 1) >= 0) {
    throw new Error(
      `@connectrpc/connect changed: ${url} no longer has the code src/transport/connect-fixes.js patches. ` +
        "See what it now does there (request parsing, error writing), then update or delete the patch.",
    );
  }
  const patched = source.slice(0, at) + patch.replace + source.slice(at + patch.find.length);
  return { ...loaded, source: patched + patch.helper + registered(patch.name) };
}

// A module load hook (node:module register) that fixes postgres.js 3.4.x as
// it is loaded: after a statement fails part-way through its rows (a row
// that cannot be computed, a statement timeout, a cancel), the connection's
// row counter keeps its value, and the next statement on that connection
// resolves with its rows written after that many holes (a sparse array).
// Upstream: porsager/postgres#1119 and #1181, fix proposed in #1190.
//
// The fix resets the counter wherever the connection starts a fresh result,
// which is once per statement, when the server says it is ready again.
//
// Drop this file, and its registration in ./postgres.ts, once a postgres.js
// release carries the fix: the hook then fails loudly, because the text it
// patches has changed.
//
// Plain JavaScript: hooks run on their own thread, before any TypeScript
// loader can be relied upon.

const connectionModule = /\/node_modules\/postgres\/src\/connection\.js$/;

// Where ReadyForQuery replaces the finished statement's result.
const freshResult = "    result = new Result()\n    connectTimer.cancel()\n";
const freshResultAndCounter = "    result = new Result()\n    rows = 0\n    connectTimer.cancel()\n";

/** Set by the patched module, so that the importer can tell it was patched. */
const marker = 'globalThis[Symbol.for("keys-driver-service.postgres-rows-fix")] = true;\n';

/** @type {import("node:module").LoadHook} */
export async function load(url, context, nextLoad) {
  const loaded = await nextLoad(url, context);
  if (!url.startsWith("file:") || !connectionModule.test(new URL(url).pathname)) return loaded;
  const source = typeof loaded.source === "string" ? loaded.source : new TextDecoder().decode(loaded.source);
  const at = source.indexOf(freshResult);
  if (at < 0 || source.indexOf(freshResult, at + 1) >= 0) {
    throw new Error(
      `postgres.js changed: ${url} no longer has the code src/db/postgres-rows-fix.js patches. ` +
        "If the installed release fixes porsager/postgres#1181, delete the fix; otherwise update it.",
    );
  }
  const patched = marker + source.slice(0, at) + freshResultAndCounter + source.slice(at + freshResult.length);
  return { ...loaded, source: patched };
}

// A module load hook (node:module register) that fixes two bugs of
// postgres.js 3.4.x as it is loaded, both in src/connection.js:
//
// 1. After a statement fails part-way through its rows (a row that cannot
//    be computed, a statement timeout, a cancel), the connection's row
//    counter keeps its value, and the next statement on that connection
//    resolves with its rows written after that many holes (a sparse array).
//    Upstream: porsager/postgres#1119 and #1181, fix proposed in #1190. The
//    fix resets the counter wherever the connection starts a fresh result,
//    which is once per statement, when the server says it is ready again.
//
// 2. With `fetch_types: false` (which the service sets, see ./client.ts),
//    `sql.reserve()` on a connection that is still opening never resolves:
//    when the connection becomes ready it returns early instead of offering
//    itself to the waiting reservation. Upstream: porsager/postgres#751 and
//    #1219, fix proposed in #1220. The fix lets a connection opened for a
//    reservation go on to be offered, as one opened for a query is.
//
// Drop a patch, or this file and its registration in ./postgres.ts, once a
// postgres.js release carries the fix: the hook fails loudly when the text
// it patches has changed.
//
// Plain JavaScript: hooks run on their own thread, before any TypeScript
// loader can be relied upon.

const connectionModule = /\/node_modules\/postgres\/src\/connection\.js$/;

/** Each patch replaces text that occurs exactly once in connection.js. */
const patches = [
  {
    issue: "porsager/postgres#1181",
    // Where ReadyForQuery replaces the finished statement's result.
    find: "    result = new Result()\n    connectTimer.cancel()\n",
    replace: "    result = new Result()\n    rows = 0\n    connectTimer.cancel()\n",
  },
  {
    issue: "porsager/postgres#1219",
    // Where ReadyForQuery ends a connection's start-up without fetching types.
    find:
      "      initial && !initial.reserve && execute(initial)\n" +
      "      options.shared.retries = retries = 0\n" +
      "      initial = null\n" +
      "      return\n",
    replace:
      "      const reserving = initial && initial.reserve\n" +
      "      initial && !initial.reserve && execute(initial)\n" +
      "      options.shared.retries = retries = 0\n" +
      "      initial = null\n" +
      "      if (!reserving) return\n",
  },
];

/** Set by the patched module, so that the importer can tell it was patched. */
const marker = 'globalThis[Symbol.for("keys-driver-service.postgres-fixes")] = true;\n';

/** @type {import("node:module").LoadHook} */
export async function load(url, context, nextLoad) {
  const loaded = await nextLoad(url, context);
  if (!url.startsWith("file:") || !connectionModule.test(new URL(url).pathname)) return loaded;
  let source = typeof loaded.source === "string" ? loaded.source : new TextDecoder().decode(loaded.source);
  for (const { issue, find, replace } of patches) {
    const at = source.indexOf(find);
    if (at < 0 || source.indexOf(find, at + 1) >= 0) {
      throw new Error(
        `postgres.js changed: ${url} no longer has the code src/db/postgres-fixes.js patches for ${issue}. ` +
          `If the installed release fixes ${issue}, delete that patch; otherwise update it.`,
      );
    }
    source = source.slice(0, at) + replace + source.slice(at + find.length);
  }
  return { ...loaded, source: marker + source };
}

// A module load hook (node:module register) that fixes three bugs of
// postgres.js 3.4.x as it is loaded, in its src/connection.js and
// src/index.js:
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
// 3. A connection whose server went away (a terminated backend, a restart)
//    keeps its pending write timer and buffered bytes: a reserved
//    connection (a transaction, a snapshot) that is then asked to run a
//    statement writes to a socket that is gone, from a timer, which throws
//    outside any promise and ends the process; and a pooled connection that
//    reconnects sends the stale bytes before its start-up message.
//    Upstream: porsager/postgres#1066, #1154 and #1208, guards proposed in
//    #1168. The fix forgets the buffered write when the connection closes or
//    is terminated, and fails a statement given to a closed connection with
//    CONNECTION_CLOSED, as one that was running when it closed fails (and
//    leaves the connection able to fail the next one too, e.g. the
//    transaction's rollback, rather than queueing it forever); a reserved
//    connection released after it closed is left closed, to reconnect when
//    needed, rather than put back in the pool without a socket.
//
// It also adds one thing postgres.js lacks, a view of its pool's queues
// (connections idle, busy, reserved, connecting; statements waiting for a
// connection), read by the metrics.
//
// Drop a patch, or this file and its registration in ./postgres.ts, once a
// postgres.js release carries the fix: the hook fails loudly when the text
// it patches has changed.
//
// Plain JavaScript: hooks run on their own thread, before any TypeScript
// loader can be relied upon.

const patchedModule = /\/node_modules\/postgres\/src\/(connection|index)\.js$/;

/** Each patch replaces text that occurs exactly once in its file (of postgres.js's src/). */
const patches = [
  {
    file: "connection.js",
    issue: "porsager/postgres#1181",
    // Where ReadyForQuery replaces the finished statement's result.
    find: "    result = new Result()\n    connectTimer.cancel()\n",
    replace: "    result = new Result()\n    rows = 0\n    connectTimer.cancel()\n",
  },
  {
    file: "connection.js",
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
  {
    file: "connection.js",
    issue: "porsager/postgres#1208",
    // A statement handed to a connection whose socket is gone.
    find: "    if (terminated)\n" + "      return queryError(q, Errors.connection('CONNECTION_DESTROYED', options))\n",
    replace:
      "    if (terminated)\n" +
      "      return queryError(q, Errors.connection('CONNECTION_DESTROYED', options))\n" +
      "    if (socket === null)\n" +
      "      return queryError(q, Errors.connection('CONNECTION_CLOSED', options)), true\n",
  },
  {
    file: "connection.js",
    issue: "porsager/postgres#1154",
    // terminate(): the pending write goes with the connection.
    find: "    clearImmediate(nextWriteTimer)\n    if (socket) {\n",
    replace: "    clearImmediate(nextWriteTimer)\n    chunk = nextWriteTimer = null\n    if (socket) {\n",
  },
  {
    file: "connection.js",
    issue: "porsager/postgres#1154",
    // closed(): likewise.
    find: "    clearImmediate(nextWriteTimer)\n    socket.removeListener('data', data)\n",
    replace:
      "    clearImmediate(nextWriteTimer)\n    chunk = nextWriteTimer = null\n    socket.removeListener('data', data)\n",
  },
  {
    file: "index.js",
    issue: "porsager/postgres#1208",
    // A reserved connection released after it closed stays closed (to be
    // reconnected on demand) instead of rejoining the pool without a socket.
    find: "    sql.release = () => {\n      c.reserved = null\n      onopen(c)\n    }\n",
    replace: "    sql.release = () => {\n      c.reserved = null\n      c.queue === closed || onopen(c)\n    }\n",
  },
  {
    file: "index.js",
    issue: "pool state (not a bug: postgres.js has no public view of its pool)",
    // The pool's queues, counted on demand for the metrics (src/db/client.ts poolState).
    find: "    options,\n    reserve,\n    listen,\n",
    replace:
      "    options,\n" +
      '    [Symbol.for("keys-driver-service.pool")]: () => ({\n' +
      "      queued: queries.length, connecting: connecting.length, idle: open.length,\n" +
      "      busy: busy.length + full.length, reserved: reserved.length, closed: closed.length + ended.length,\n" +
      "    }),\n" +
      "    reserve,\n    listen,\n",
  },
];

/** The mark each patched file leaves, so that the importer can tell it was patched. */
const mark = (file) => `(globalThis[Symbol.for("keys-driver-service.postgres-fixes")] ??= new Set()).add("${file}");\n`;

/** @type {import("node:module").LoadHook} */
export async function load(url, context, nextLoad) {
  const loaded = await nextLoad(url, context);
  const file = url.startsWith("file:") ? patchedModule.exec(new URL(url).pathname)?.[1] : undefined;
  if (file === undefined) return loaded;
  let source = typeof loaded.source === "string" ? loaded.source : new TextDecoder().decode(loaded.source);
  for (const { issue, find, replace } of patches.filter((p) => p.file === `${file}.js`)) {
    const at = source.indexOf(find);
    if (at < 0 || source.indexOf(find, at + 1) >= 0) {
      throw new Error(
        `postgres.js changed: ${url} no longer has the code src/db/postgres-fixes.js patches for ${issue}. ` +
          `If the installed release fixes ${issue}, delete that patch; otherwise update it.`,
      );
    }
    source = source.slice(0, at) + replace + source.slice(at + find.length);
  }
  return { ...loaded, source: mark(`${file}.js`) + source };
}

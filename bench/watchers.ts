// WatchKeys streams in a process of their own, for the benchmark: opens the
// streams its plan (JSON on stdin's first line) asks for, says "ready" once
// every stream has sent its first message, records every change it receives
// (key, version, arrival time), and on a "stop" line writes what it saw as
// JSON and exits.
import { setMaxListeners } from "node:events";
import readline from "node:readline";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";

/** Which streams to open. */
export interface WatchersPlan {
  readonly address: string;
  readonly streams: readonly ({ readonly tenantId: string } | { readonly allTenants: true })[];
  /** Keep every receipt (latency runs) or only count them (throughput and memory runs). */
  readonly record: boolean;
  /** When this many changes have arrived in all, say "all" (fan-out runs). */
  readonly expectChanges?: number;
}

/** What the watchers saw. */
export interface WatchersResult {
  /** Per change received: key id, key version, arrival (ms since the epoch, fractional). */
  readonly receipts: [string, string, number][];
  readonly changes: number;
  /** Arrival of the first and the last change, ms since the epoch. */
  readonly firstAt: number;
  readonly lastAt: number;
  /** Times a stream was ended by the server and resumed from its cursor. */
  readonly resumes: number;
}

const now = () => performance.timeOrigin + performance.now();

const lines = readline.createInterface({ input: process.stdin });
const iterator = lines[Symbol.asyncIterator]();
const plan = JSON.parse(((await iterator.next()).value as string) ?? "{}") as WatchersPlan;
const client = createClient(KeysDriverService, createGrpcTransport({ baseUrl: `http://${plan.address}` }));
const abort = new AbortController();
setMaxListeners(0, abort.signal); // one signal for every stream
const receipts: [string, string, number][] = [];
let changes = 0;
let firstAt = 0;
let lastAt = 0;
let ready = 0;

let resumes = 0;

// Each stream consumes as a gateway does (README): it keeps the last cursor
// and, when the server ends the stream (RESOURCE_EXHAUSTED when it fell
// behind, UNAVAILABLE), resumes from it.
const streams = plan.streams.map(async (scope) => {
  let first = true;
  let cursor = "";
  for (;;) {
    try {
      for await (const message of client.watchKeys({ ...scope, resumeCursor: cursor }, { signal: abort.signal })) {
        if (first) {
          first = false;
          if (++ready === plan.streams.length) process.stdout.write("ready\n");
        }
        cursor = message.cursor;
        const change = message.change;
        if (!change?.key) continue;
        const at = now();
        changes++;
        if (changes === plan.expectChanges) process.stdout.write("all\n");
        firstAt ||= at;
        lastAt = at;
        if (plan.record) receipts.push([change.key.id, change.key.etag.split(".")[0] ?? "", at]);
      }
      return;
    } catch (err) {
      if (abort.signal.aborted) return;
      const code = err instanceof ConnectError ? err.code : undefined;
      if (cursor === "" || (code !== Code.ResourceExhausted && code !== Code.Unavailable)) {
        process.stderr.write(`watcher failed: ${String(err)}\n`);
        return;
      }
      resumes++;
    }
  }
});

await iterator.next(); // "stop"
abort.abort();
await Promise.all(streams);
// Exits once the (large) line is written, not before.
process.stdout.write(
  `${JSON.stringify({ receipts, changes, firstAt, lastAt, resumes } satisfies WatchersResult)}\n`,
  () => process.exit(0),
);

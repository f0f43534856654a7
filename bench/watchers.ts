// WatchKeys streams in a process of their own, for the benchmark: opens the
// streams its plan (JSON on stdin's first line) asks for, says "ready" once
// every stream has sent its first message, records every change it receives
// (key, version, arrival time), and on a "stop" line writes what it saw as
// JSON and exits.
import readline from "node:readline";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import {
  KeysDriverService,
  type WatchKeysRequest,
  WatchKeysRequestSchema,
  type WatchKeysResponse,
  WatchKeysResponseSchema,
} from "../gen/keysdriver/v1/keys_driver_pb.js";

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
  /** Per change received: key id, key version, arrival and commit (ms since the epoch, fractional). */
  readonly receipts: [string, string, number, number][];
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
// A gateway's client: @grpc/grpc-js, one connection for every stream.
const client = new grpc.Client(plan.address, grpc.credentials.createInsecure());
const watchPath = `/${KeysDriverService.typeName}/${KeysDriverService.method.watchKeys.name}`;
let stopping = false;
const open = new Set<grpc.ClientReadableStream<WatchKeysResponse>>();

/** One WatchKeys call; `onMessage` for each message; settles with the status it ended with. */
function watch(request: WatchKeysRequest, onMessage: (m: WatchKeysResponse) => void): Promise<grpc.StatusObject> {
  const call = client.makeServerStreamRequest(
    watchPath,
    (m: WatchKeysRequest) => Buffer.from(toBinary(WatchKeysRequestSchema, m)),
    (b: Buffer) => fromBinary(WatchKeysResponseSchema, b),
    request,
  );
  open.add(call);
  call.on("data", onMessage);
  return new Promise((resolve) => {
    call.on("error", () => {}); // the status below says it all
    call.on("status", (status: grpc.StatusObject) => {
      open.delete(call);
      resolve(status);
    });
  });
}
const receipts: [string, string, number, number][] = [];
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
    const status = await watch(create(WatchKeysRequestSchema, { ...scope, resumeCursor: cursor }), (message) => {
      if (first) {
        first = false;
        if (++ready === plan.streams.length) process.stdout.write("ready\n");
      }
      cursor = message.cursor;
      const change = message.change;
      if (!change?.key) return;
      const at = now();
      changes++;
      if (changes === plan.expectChanges) process.stdout.write("all\n");
      firstAt ||= at;
      lastAt = at;
      if (plan.record) {
        const committed = change.changedAt;
        const committedAt = committed ? Number(committed.seconds) * 1000 + committed.nanos / 1e6 : Number.NaN;
        receipts.push([change.key.id, change.key.etag.split(".")[0] ?? "", at, committedAt]);
      }
    });
    if (stopping || status.code === grpc.status.OK) return;
    const resumable = status.code === grpc.status.RESOURCE_EXHAUSTED || status.code === grpc.status.UNAVAILABLE;
    if (cursor === "" || !resumable) {
      process.stderr.write(`watcher failed: ${grpc.status[status.code]} ${status.details}\n`);
      return;
    }
    resumes++;
  }
});

await iterator.next(); // "stop"
stopping = true;
for (const call of open) call.cancel();
await Promise.all(streams);
client.close();
// Exits once the (large) line is written, not before.
process.stdout.write(
  `${JSON.stringify({ receipts, changes, firstAt, lastAt, resumes } satisfies WatchersResult)}\n`,
  () => process.exit(0),
);

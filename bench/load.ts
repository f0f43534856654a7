// A gRPC load generator: its own process, HTTP/2 through Node's nghttp2
// binding, pre-encoded varied requests, a fixed number of calls in flight,
// and every call's grpc-status read from its trailers (an HTTP 200 is not a
// success in gRPC). Reads its plan as JSON on stdin, writes results as JSON.
import http2 from "node:http2";

/** One request the generator may send. */
export interface PlannedCall {
  readonly path: string;
  /** The gRPC length-prefixed message, base64. */
  readonly frame: string;
}

/** What to run. */
export interface LoadPlan {
  readonly address: string;
  readonly calls: readonly PlannedCall[];
  readonly connections: number;
  /** Calls in flight at once, spread over the connections. */
  readonly concurrency: number;
  readonly warmupMs: number;
  readonly durationMs: number;
  /** Throughput is also reported per bucket of this length (soak mode). */
  readonly bucketMs: number;
  /**
   * Open loop: start this many calls a second whatever the answers (as
   * independent callers do), instead of `concurrency` calls in flight; at
   * most `maxOutstanding` unanswered at once (more are counted as
   * "not-sent").
   */
  readonly arrivalsPerSecond?: number;
  readonly maxOutstanding?: number;
}

/** What came out. */
export interface LoadResult {
  readonly calls: number;
  readonly seconds: number;
  readonly callsPerSecond: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
  /** Completed calls by grpc-status ("0" = OK). */
  readonly statuses: Record<string, number>;
  /** The 99th percentile latency of the calls answered OK, and of the rest. */
  readonly okP99Ms: number;
  readonly failedP99Ms: number;
  /** Calls completed in each bucket, after warm-up. */
  readonly buckets: number[];
  /** CPU the generator itself used, per call, in microseconds. */
  readonly generatorCpuUsPerCall: number;
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? Number.NaN;
}

async function run(plan: LoadPlan): Promise<LoadResult> {
  const frames = plan.calls.map((c) => ({ path: c.path, body: Buffer.from(c.frame, "base64") }));
  // A connection the server closes (GOAWAY) is replaced; how often is reported.
  let connectionsLost = 0;
  const connect = () => {
    const session = http2.connect(`http://${plan.address}`);
    session.on("error", () => {});
    session.on("goaway", () => connectionsLost++);
    return session;
  };
  const sessions = await Promise.all(
    Array.from({ length: plan.connections }, () => {
      const session = connect();
      return new Promise<http2.ClientHttp2Session>((resolve, reject) => {
        session.once("connect", () => resolve(session));
        session.once("error", reject);
      });
    }),
  );
  const sessionFor = (i: number): http2.ClientHttp2Session => {
    const at = i % sessions.length;
    let session = sessions[at] as http2.ClientHttp2Session;
    if (session.destroyed || session.closed) {
      session = connect();
      sessions[at] = session;
    }
    return session;
  };

  let next = 0;
  let latencies = new Float64Array(1 << 16);
  let recorded = 0;
  const okLatencies: number[] = [];
  const failedLatencies: number[] = [];
  const statuses: Record<string, number> = {};
  const start = performance.now();
  const measureFrom = start + plan.warmupMs;
  const stopAt = measureFrom + plan.durationMs;
  const buckets = new Array<number>(Math.max(1, Math.ceil(plan.durationMs / plan.bucketMs))).fill(0);
  let cpuStart = process.cpuUsage();

  const record = (began: number, status: string) => {
    const now = performance.now();
    if (began < measureFrom) return;
    if (recorded === latencies.length) {
      const grown = new Float64Array(latencies.length * 2);
      grown.set(latencies);
      latencies = grown;
    }
    latencies[recorded++] = now - began;
    (status === "0" ? okLatencies : failedLatencies).push(now - began);
    statuses[status] = (statuses[status] ?? 0) + 1;
    const bucket = Math.floor((now - measureFrom) / plan.bucketMs);
    if (bucket < buckets.length) buckets[bucket] = (buckets[bucket] ?? 0) + 1;
  };

  let warm = false;
  /** Sends one call on connection `connection`; `then` runs when it has closed. */
  const send = (connection: number, then: () => void) => {
    const call = frames[next++ % frames.length];
    if (!call) return then();
    const began = performance.now();
    let status = "no-status";
    let stream: http2.ClientHttp2Stream;
    try {
      stream = sessionFor(connection).request({
        ":method": "POST",
        ":path": call.path,
        "content-type": "application/grpc",
        te: "trailers",
      });
    } catch {
      // A connection closing under the call: counted, and the next call gets a new one.
      record(began, "stream-error");
      setImmediate(then);
      return;
    }
    stream.on("response", (headers) => {
      const s = headers["grpc-status"]; // trailers-only responses
      if (s !== undefined) status = String(s);
    });
    stream.on("trailers", (trailers) => {
      const s = trailers["grpc-status"];
      if (s !== undefined) status = String(s);
    });
    stream.on("data", () => {});
    stream.on("error", () => {
      status = "stream-error";
    });
    stream.on("close", () => {
      record(began, status);
      then();
    });
    stream.end(call.body);
  };
  const loop = (connection: number, done: () => void) => {
    const fire = () => {
      const now = performance.now();
      if (!warm && now >= measureFrom) {
        warm = true;
        cpuStart = process.cpuUsage();
      }
      if (now >= stopAt) return done();
      send(connection, fire);
    };
    fire();
  };

  if (plan.arrivalsPerSecond === undefined) {
    await Promise.all(
      Array.from({ length: plan.concurrency }, (_, i) => {
        return new Promise<void>((resolve) => loop(i, resolve));
      }),
    );
  } else {
    // Open loop: every millisecond, start the calls due by then.
    const rate = plan.arrivalsPerSecond;
    const maxOutstanding = plan.maxOutstanding ?? 10_000;
    let started = 0;
    let outstanding = 0;
    let skipped = 0;
    await new Promise<void>((resolve) => {
      const tick = setInterval(() => {
        const now = performance.now();
        if (!warm && now >= measureFrom) {
          warm = true;
          cpuStart = process.cpuUsage();
        }
        if (now >= stopAt) {
          clearInterval(tick);
          const drained = setInterval(() => {
            if (outstanding === 0) {
              clearInterval(drained);
              resolve();
            }
          }, 5);
          return;
        }
        const due = Math.floor(((now - start) / 1000) * rate);
        for (; started < due; started++) {
          if (outstanding >= maxOutstanding) {
            if (now >= measureFrom) skipped++;
            continue;
          }
          outstanding++;
          send(started, () => outstanding--);
        }
      }, 1);
    });
    if (skipped > 0) statuses["not-sent"] = skipped;
  }
  if (connectionsLost > 0) statuses["connection-closed-by-server"] = connectionsLost;
  const cpu = process.cpuUsage(cpuStart);
  for (const s of sessions) s.close();

  const sorted = latencies.slice(0, recorded).sort();
  const seconds = plan.durationMs / 1000;
  return {
    calls: recorded,
    seconds,
    callsPerSecond: recorded / seconds,
    p50Ms: percentile(sorted, 0.5),
    p99Ms: percentile(sorted, 0.99),
    statuses,
    okP99Ms: percentile(Float64Array.from(okLatencies).sort(), 0.99),
    failedP99Ms: percentile(Float64Array.from(failedLatencies).sort(), 0.99),
    buckets,
    generatorCpuUsPerCall: recorded ? (cpu.user + cpu.system) / recorded : 0,
  };
}

const chunks: Buffer[] = [];
for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
const result = await run(JSON.parse(Buffer.concat(chunks).toString("utf8")) as LoadPlan);
process.stdout.write(JSON.stringify(result));

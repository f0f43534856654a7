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
  const sessions = await Promise.all(
    Array.from({ length: plan.connections }, () => {
      const session = http2.connect(`http://${plan.address}`);
      session.on("error", () => {});
      return new Promise<http2.ClientHttp2Session>((resolve, reject) => {
        session.once("connect", () => resolve(session));
        session.once("error", reject);
      });
    }),
  );

  let next = 0;
  let latencies = new Float64Array(1 << 16);
  let recorded = 0;
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
    statuses[status] = (statuses[status] ?? 0) + 1;
    const bucket = Math.floor((now - measureFrom) / plan.bucketMs);
    if (bucket < buckets.length) buckets[bucket] = (buckets[bucket] ?? 0) + 1;
  };

  let warm = false;
  const loop = (session: http2.ClientHttp2Session, done: () => void) => {
    const fire = () => {
      const now = performance.now();
      if (!warm && now >= measureFrom) {
        warm = true;
        cpuStart = process.cpuUsage();
      }
      if (now >= stopAt) return done();
      const call = frames[next++ % frames.length];
      if (!call) return done();
      const began = now;
      let status = "no-status";
      const stream = session.request({
        ":method": "POST",
        ":path": call.path,
        "content-type": "application/grpc",
        te: "trailers",
      });
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
        fire();
      });
      stream.end(call.body);
    };
    fire();
  };

  await Promise.all(
    Array.from({ length: plan.concurrency }, (_, i) => {
      const session = sessions[i % sessions.length] as http2.ClientHttp2Session;
      return new Promise<void>((resolve) => loop(session, resolve));
    }),
  );
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
    buckets,
    generatorCpuUsPerCall: recorded ? (cpu.user + cpu.system) / recorded : 0,
  };
}

const chunks: Buffer[] = [];
for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
const result = await run(JSON.parse(Buffer.concat(chunks).toString("utf8")) as LoadPlan);
process.stdout.write(JSON.stringify(result));

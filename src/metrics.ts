import type { DescMethod } from "@bufbuild/protobuf";
import { Counter, collectDefaultMetrics, Gauge, type Metric, Registry } from "prom-client";
import type { PoolState } from "./db/client.js";

/**
 * The service's metrics, with prom-client, in the Prometheus text format at
 * GET /metrics. Calls are named as the gRPC ecosystem's server metrics are
 * (grpc_server_handled_total, grpc_server_handling_seconds), so existing
 * dashboards and alerts apply; the rest are keysdriver_*. In worker mode
 * the primary aggregates every worker's registry with prom-client's
 * AggregatorRegistry (src/process/workers.ts).
 */

/** Latency buckets, in seconds: from a cached read to a call stuck behind a lock. */
const latencyBuckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

const grpcType: Record<DescMethod["methodKind"], string> = {
  unary: "unary",
  server_streaming: "server_stream",
  client_streaming: "client_stream",
  bidi_streaming: "bidi_stream",
};

/** What the metrics read when scraped. */
export interface MetricSources {
  /** The request path's connection pool. */
  readonly pool?: () => PoolState;
  /** WatchKeys streams open in this process. */
  readonly watchStreams?: () => number;
}

/** One process's metrics. */
export interface Metrics {
  readonly registry: Registry;
  /** Counts one call that ended with `code` (e.g. "NOT_FOUND") after `seconds`. */
  record(method: DescMethod, code: string, seconds: number): void;
  /** Calls counted so far, by "Method CODE" (e.g. "CountKeys OK"). */
  calls(): Promise<Record<string, number>>;
}

/** A fresh registry with the service's metrics and the process's own (CPU, memory, event loop). */
export function createMetrics(sources: MetricSources = {}): Metrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  // Calls are counted on the request path in plain numbers, one MethodCalls
  // a method, and handed to prom-client when it is scraped: its labelled
  // inc and observe build and check a label key on every call.
  const methods = new Map<DescMethod, MethodCalls>();
  const handled = new Counter({
    name: "grpc_server_handled_total",
    help: "Calls completed, by method and status code, whatever the protocol (gRPC, Connect, gRPC-Web).",
    labelNames: ["grpc_service", "grpc_method", "grpc_type", "grpc_code"] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const calls of methods.values()) {
        for (const [code, count] of calls.codes) this.inc({ ...calls.labels, grpc_code: code }, count);
      }
    },
  });
  registry.registerMetric(
    new CallLatencies(
      "grpc_server_handling_seconds",
      "Time from a call's start to its end, by method (streams: until the stream ends).",
      methods,
    ) as unknown as Metric,
  );
  new Gauge({
    name: "keysdriver_processes",
    help: "Processes serving (summed over the workers in worker mode).",
    registers: [registry],
  }).set(1);
  const pool = sources.pool;
  if (pool) {
    new Gauge({
      name: "keysdriver_db_pool_connections",
      help: "The request path's PostgreSQL connections, by state.",
      labelNames: ["state"] as const,
      registers: [registry],
      collect() {
        const state = pool();
        for (const name of ["idle", "busy", "reserved", "connecting", "closed"] as const) {
          this.set({ state: name }, state[name]);
        }
      },
    });
    new Gauge({
      name: "keysdriver_db_pool_waiting_statements",
      help: "Statements waiting for a free connection of the pool.",
      registers: [registry],
      collect() {
        this.set(pool().queued);
      },
    });
  }
  const watchStreams = sources.watchStreams;
  if (watchStreams) {
    new Gauge({
      name: "keysdriver_watch_streams",
      help: "WatchKeys streams open.",
      registers: [registry],
      collect() {
        this.set(watchStreams());
      },
    });
  }

  return {
    registry,
    record(method, code, seconds) {
      let calls = methods.get(method);
      if (!calls) {
        calls = new MethodCalls(method);
        methods.set(method, calls);
      }
      calls.record(code, seconds);
    },
    async calls() {
      const out: Record<string, number> = {};
      for (const { labels, value } of (await handled.get()).values) {
        const key = `${labels.grpc_method} ${labels.grpc_code}`;
        out[key] = (out[key] ?? 0) + value;
      }
      return out;
    },
  };
}

/** One method's calls: how many ended with each code, and how long they took. */
class MethodCalls {
  readonly labels: { grpc_service: string; grpc_method: string; grpc_type: string };
  readonly codes = new Map<string, number>();
  /** Calls by latency bucket (not cumulative); the last is past the largest bound. */
  readonly buckets = new Array<number>(latencyBuckets.length + 1).fill(0);
  sum = 0;
  count = 0;

  constructor(method: DescMethod) {
    this.labels = {
      grpc_service: method.parent.typeName,
      grpc_method: method.name,
      grpc_type: grpcType[method.methodKind],
    };
  }

  record(code: string, elapsed: number): void {
    // A clock that stepped back is not a negative duration (nor NaN in the sum).
    const seconds = Number.isFinite(elapsed) && elapsed > 0 ? elapsed : 0;
    this.codes.set(code, (this.codes.get(code) ?? 0) + 1);
    let bucket = 0;
    while (bucket < latencyBuckets.length && seconds > (latencyBuckets[bucket] as number)) bucket++;
    this.buckets[bucket] = (this.buckets[bucket] as number) + 1;
    this.sum += seconds;
    this.count++;
  }
}

/**
 * The latency histogram, read from the methods' counts when scraped: a
 * metric of prom-client's registry (text format, cluster aggregation by
 * sum) that gives what its Histogram would: cumulative `_bucket` series
 * with `le`, `_sum` and `_count`.
 */
class CallLatencies {
  readonly type = "histogram";
  readonly aggregator = "sum";

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly methods: Map<DescMethod, MethodCalls>,
  ) {}

  get() {
    const values: { metricName: string; labels: Record<string, string | number>; value: number }[] = [];
    for (const calls of this.methods.values()) {
      let cumulative = 0;
      calls.buckets.forEach((count, i) => {
        cumulative += count;
        const le = latencyBuckets[i] ?? "+Inf";
        values.push({ metricName: `${this.name}_bucket`, labels: { le, ...calls.labels }, value: cumulative });
      });
      values.push({ metricName: `${this.name}_sum`, labels: calls.labels, value: calls.sum });
      values.push({ metricName: `${this.name}_count`, labels: calls.labels, value: calls.count });
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }

  /** As prom-client's own reset: every series goes (the call counts with them). */
  reset(): void {
    this.methods.clear();
  }
}

/** The background jobs' metrics (the usage rollup), kept by the process that runs them. */
export interface JobMetrics {
  readonly registry: Registry;
  /** One run of the rollup: how it ended, how many days it rolled up, how many closed days are left. */
  rollupRan(outcome: "rolled" | "idle" | "busy" | "failed", days: number, lagDays?: number): void;
}

export function createJobMetrics(): JobMetrics {
  const registry = new Registry();
  const runs = new Counter({
    name: "keysdriver_usage_rollup_runs_total",
    help: "Runs of the usage rollup job, by outcome: rolled (days rolled up), idle (nothing to do), busy (another process holds the job), failed.",
    labelNames: ["outcome"] as const,
    registers: [registry],
  });
  const days = new Counter({
    name: "keysdriver_usage_rollup_days_total",
    help: "UTC days rolled up into the daily usage table.",
    registers: [registry],
  });
  const lag = new Gauge({
    name: "keysdriver_usage_rollup_lag_days",
    help: "Closed UTC days not rolled up yet, as of the last run (0 when up to date; FetchKeyUsage stays exact either way, only slower).",
    registers: [registry],
  });
  const lastSuccess = new Gauge({
    name: "keysdriver_usage_rollup_last_success_timestamp_seconds",
    help: "When the usage rollup last ran to the end (Unix time).",
    registers: [registry],
  });
  return {
    registry,
    rollupRan(outcome, rolled, lagDays) {
      runs.inc({ outcome });
      if (rolled > 0) days.inc(rolled);
      if (lagDays !== undefined) lag.set(lagDays);
      if (outcome === "rolled" || outcome === "idle") lastSuccess.set(Date.now() / 1000);
    },
  };
}

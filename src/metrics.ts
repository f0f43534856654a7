import type { DescMethod } from "@bufbuild/protobuf";
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
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
  const handled = new Counter({
    name: "grpc_server_handled_total",
    help: "Calls completed, by method and status code, whatever the protocol (gRPC, Connect, gRPC-Web).",
    labelNames: ["grpc_service", "grpc_method", "grpc_type", "grpc_code"] as const,
    registers: [registry],
  });
  const handling = new Histogram({
    name: "grpc_server_handling_seconds",
    help: "Time from a call's start to its end, by method (streams: until the stream ends).",
    labelNames: ["grpc_service", "grpc_method", "grpc_type"] as const,
    buckets: latencyBuckets,
    registers: [registry],
  });
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

  // Labelled children are made once per method and code, then found by the
  // method object and the code string, without building a key per call.
  const handledBy = new Map<DescMethod, Map<string, Counter.Internal>>();
  const handlingBy = new Map<DescMethod, Histogram.Internal<string>>();
  const labelsOf = (method: DescMethod) => ({
    grpc_service: method.parent.typeName,
    grpc_method: method.name,
    grpc_type: grpcType[method.methodKind],
  });
  return {
    registry,
    record(method, code, seconds) {
      let byCode = handledBy.get(method);
      if (!byCode) {
        byCode = new Map();
        handledBy.set(method, byCode);
      }
      let counter = byCode.get(code);
      if (!counter) {
        counter = handled.labels({ ...labelsOf(method), grpc_code: code });
        byCode.set(code, counter);
      }
      counter.inc();
      let histogram = handlingBy.get(method);
      if (!histogram) {
        histogram = handling.labels(labelsOf(method));
        handlingBy.set(method, histogram);
      }
      histogram.observe(seconds);
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

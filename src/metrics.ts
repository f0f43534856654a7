/**
 * Call metrics in the Prometheus text format: calls by method and status
 * code, and time spent by method. Each process counts its own calls; in
 * worker mode the primary sums every worker's counts, so a scrape that lands
 * on any worker sees the whole service.
 */

/** One process's counts, as plain data (they cross process boundaries). */
export interface MetricsSnapshot {
  /** "method code" → calls. */
  readonly calls: Record<string, number>;
  /** method → seconds spent in the handler. */
  readonly seconds: Record<string, number>;
}

/** Counts calls in this process. */
export interface Metrics {
  record(method: string, code: string, seconds: number): void;
  snapshot(): MetricsSnapshot;
}

/** A fresh set of counters. */
export function createMetrics(): Metrics {
  const calls: Record<string, number> = {};
  const seconds: Record<string, number> = {};
  return {
    record(method, code, elapsed) {
      const key = `${method} ${code}`;
      calls[key] = (calls[key] ?? 0) + 1;
      seconds[method] = (seconds[method] ?? 0) + elapsed;
    },
    snapshot: () => ({ calls: { ...calls }, seconds: { ...seconds } }),
  };
}

/** The sum of several processes' counts. */
export function sumSnapshots(snapshots: readonly MetricsSnapshot[]): MetricsSnapshot {
  const calls: Record<string, number> = {};
  const seconds: Record<string, number> = {};
  for (const s of snapshots) {
    for (const [k, v] of Object.entries(s.calls)) calls[k] = (calls[k] ?? 0) + v;
    for (const [k, v] of Object.entries(s.seconds)) seconds[k] = (seconds[k] ?? 0) + v;
  }
  return { calls, seconds };
}

/** The Prometheus text exposition of a snapshot. */
export function renderMetrics(snapshot: MetricsSnapshot, processes: number): string {
  const lines = [
    "# HELP keysdriver_rpc_calls_total Calls handled, by method and gRPC status code name.",
    "# TYPE keysdriver_rpc_calls_total counter",
  ];
  for (const [key, value] of Object.entries(snapshot.calls).sort()) {
    const [method, code] = key.split(" ");
    lines.push(`keysdriver_rpc_calls_total{method="${method}",code="${code}"} ${value}`);
  }
  lines.push(
    "# HELP keysdriver_rpc_handler_seconds_total Time spent in handlers, by method.",
    "# TYPE keysdriver_rpc_handler_seconds_total counter",
  );
  for (const [method, value] of Object.entries(snapshot.seconds).sort()) {
    lines.push(`keysdriver_rpc_handler_seconds_total{method="${method}"} ${value.toFixed(6)}`);
  }
  lines.push(
    "# HELP keysdriver_processes Processes serving (workers in worker mode).",
    "# TYPE keysdriver_processes gauge",
    `keysdriver_processes ${processes}`,
    "",
  );
  return lines.join("\n");
}

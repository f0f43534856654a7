import cluster, { type Worker } from "node:cluster";
import { type Config, StartError } from "../config.js";
import { type MetricsSnapshot, renderMetrics, sumSnapshots } from "../metrics.js";
import { startService } from "../service.js";
import type { ShutdownRequest } from "./signals.js";

// Worker mode: a primary that owns the database set-up, the usage rollup and
// the workers' lives, and workers that share the port (node:cluster hands
// them connections in turn) and serve.

/** Messages between the primary and its workers. */
type WorkerMessage =
  | { readonly kind: "metrics"; readonly snapshot: MetricsSnapshot }
  | { readonly kind: "metrics-total"; readonly snapshot: MetricsSnapshot; readonly processes: number };

/** A worker that dies sooner than this after its start counts as a failed start. */
const healthyAfterMs = 30_000;
const firstRestartDelayMs = 1_000;
const maxRestartDelayMs = 60_000;

/** Workers that die at start, before any has ever served, before the primary gives up. */
const failedStartsBeforeGivingUp = 3;

/**
 * Runs `config.workers` workers on `databaseUrl` until a shutdown signal,
 * then drains them all. A worker that dies is replaced; one that keeps dying
 * young (a database it cannot reach) is restarted after a delay that doubles
 * each time, up to a minute, so a crash loop does not spin. If workers die at
 * start before any has ever served (a port that is taken), the start fails.
 * `onListening` is told the address once the first worker serves.
 */
export async function runWorkers(
  config: Config,
  databaseUrl: string,
  shutdown: ShutdownRequest,
  onListening: (address: string) => void,
): Promise<void> {
  const snapshots = new Map<number, MetricsSnapshot>(); // kept after a worker exits: counters only grow
  const workers = new Set<Worker>();
  const startedAt = new Map<Worker, number>();
  let restartDelayMs = firstRestartDelayMs;
  let served = false;
  let failedStarts = 0;
  let stopping = false;
  let gaveUp: (reason: StartError) => void = () => {};
  const givingUp = new Promise<never>((_, reject) => {
    gaveUp = reject;
  });

  const fork = () => {
    // Workers use the database the primary prepared; the background jobs run here.
    const worker = cluster.fork({ DATABASE_URL: databaseUrl, ROLLUP_INTERVAL_MS: "0" });
    worker.on("message", (m: WorkerMessage) => {
      if (m.kind === "metrics") snapshots.set(worker.id, m.snapshot);
    });
    workers.add(worker);
    startedAt.set(worker, Date.now());
  };
  cluster.on("listening", (_worker, address) => {
    if (served) return;
    served = true;
    onListening(`${address.address ?? config.host}:${address.port}`);
  });
  cluster.on("exit", (dead, code, signal) => {
    workers.delete(dead);
    const lived = Date.now() - (startedAt.get(dead) ?? 0);
    startedAt.delete(dead);
    if (stopping) return;
    if (!served && ++failedStarts >= failedStartsBeforeGivingUp) {
      gaveUp(new StartError(`${failedStarts} workers failed to start (see above); stopping`));
      return;
    }
    restartDelayMs = lived >= healthyAfterMs ? firstRestartDelayMs : restartDelayMs;
    console.error(
      `worker ${dead.process.pid} exited (${signal ?? code}) after ${Math.round(lived / 1000)} s; starting another in ${restartDelayMs / 1000} s`,
    );
    // Not unref'd: while every worker waits for its restart, this timer is what keeps the primary alive.
    setTimeout(() => {
      if (!stopping) fork();
    }, restartDelayMs);
    if (lived < healthyAfterMs) restartDelayMs = Math.min(restartDelayMs * 2, maxRestartDelayMs);
  });
  for (let i = 0; i < config.workers; i++) fork();

  // Every worker renders /metrics from this total, so any of them answers for all.
  const broadcast = setInterval(() => {
    const message: WorkerMessage = {
      kind: "metrics-total",
      snapshot: sumSnapshots([...snapshots.values()]),
      processes: workers.size,
    };
    for (const w of workers) if (w.isConnected()) w.send(message);
  }, 1000);
  broadcast.unref();

  let failure: unknown;
  const signal = await Promise.race([shutdown.requested, givingUp]).catch((err: unknown) => {
    failure = err;
    return "start failure";
  });
  stopping = true;
  clearInterval(broadcast);
  if (failure === undefined) console.log(`${signal}: draining ${workers.size} workers, then stopping`);
  await Promise.all(
    [...workers].map(
      (w) =>
        new Promise<void>((resolve) => {
          if (w.isDead()) return resolve();
          w.once("exit", () => resolve());
          w.process.kill("SIGTERM");
        }),
    ),
  );
  if (failure !== undefined) throw failure;
}

/** One worker: serves the port until told to stop, reporting its counts to the primary every second. */
export async function runWorker(config: Config, shutdown: ShutdownRequest): Promise<void> {
  let total: { snapshot: MetricsSnapshot; processes: number } | undefined;
  process.on("message", (m: WorkerMessage) => {
    if (m.kind === "metrics-total") total = m;
  });
  const service = await startService(
    { ...config, databaseUrl: config.databaseUrl ?? "" },
    { metricsText: (own) => (total ? renderMetrics(total.snapshot, total.processes) : renderMetrics(own, 1)) },
  );
  const report = setInterval(
    () => process.send?.({ kind: "metrics", snapshot: service.metrics.snapshot() } satisfies WorkerMessage),
    1000,
  );
  report.unref();
  await shutdown.requested;
  clearInterval(report);
  await service.close(config.shutdownGraceMs);
  process.disconnect?.();
}

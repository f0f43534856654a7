import cluster, { type Worker } from "node:cluster";
import { AggregatorRegistry, type Registry } from "prom-client";
import { type Config, StartError } from "../config.js";
import { startService } from "../service.js";
import type { ShutdownRequest } from "./signals.js";

// Worker mode: a primary that owns the database set-up, the usage rollup and
// the workers' lives, and workers that share the port (node:cluster hands
// them connections in turn) and serve.

/**
 * Messages between the primary and its workers: a worker asked for /metrics
 * asks the primary, which gathers every worker's registry (prom-client's
 * AggregatorRegistry, over its own messages) and adds its own (the jobs').
 */
type WorkerMessage =
  | { readonly kind: "metrics-request"; readonly id: number }
  | { readonly kind: "metrics-text"; readonly id: number; readonly text?: string; readonly error?: string };

/** How long a worker waits for the primary's metrics. */
const metricsTimeoutMs = 6_000;

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
  primaryMetrics: Registry,
): Promise<void> {
  const aggregator = new AggregatorRegistry();
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
      if (m.kind !== "metrics-request") return;
      Promise.all([aggregator.clusterMetrics(), primaryMetrics.metrics()]).then(
        ([workers, own]) => answer({ kind: "metrics-text", id: m.id, text: workers + own }),
        (err: unknown) => answer({ kind: "metrics-text", id: m.id, error: String(err) }),
      );
      const answer = (message: WorkerMessage) => {
        if (worker.isConnected()) worker.send(message);
      };
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

  let failure: unknown;
  const signal = await Promise.race([shutdown.requested, givingUp]).catch((err: unknown) => {
    failure = err;
    return "start failure";
  });
  stopping = true;
  if (failure === undefined) console.error(`${signal}: draining ${workers.size} workers, then stopping`);
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

/**
 * One worker: serves the port until told to stop. Its /metrics are the
 * whole service's: it asks the primary, which gathers them from every
 * worker, this one included.
 */
export async function runWorker(config: Config, shutdown: ShutdownRequest): Promise<void> {
  const pending = new Map<number, (m: WorkerMessage) => void>();
  let nextId = 0;
  process.on("message", (m: WorkerMessage) => {
    if (m.kind === "metrics-text") pending.get(m.id)?.(m);
  });
  const askPrimary = () =>
    new Promise<string>((resolve, reject) => {
      const id = nextId++;
      const timer = setTimeout(
        () => settle({ kind: "metrics-text", id, error: "the primary did not answer" }),
        metricsTimeoutMs,
      );
      const settle = (m: WorkerMessage) => {
        clearTimeout(timer);
        pending.delete(id);
        if (m.kind === "metrics-text" && m.text !== undefined) resolve(m.text);
        else reject(new Error(m.kind === "metrics-text" ? m.error : "unexpected answer"));
      };
      pending.set(id, settle);
      process.send?.({ kind: "metrics-request", id } satisfies WorkerMessage);
    });
  const service = await startService({ ...config, databaseUrl: config.databaseUrl ?? "" }, { metricsText: askPrimary });
  // The primary's AggregatorRegistry asks each worker for this registry.
  AggregatorRegistry.setRegistries([service.metrics.registry]);
  new AggregatorRegistry();
  await shutdown.requested;
  await service.close(config.shutdownGraceMs);
  process.disconnect?.();
}

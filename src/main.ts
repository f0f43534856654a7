import cluster, { type Worker } from "node:cluster";
import { type Config, ConfigError, loadConfig } from "./config.js";
import type { Sql } from "./db/client.js";
import { demoKeys, demoTenants, loadDemoDataOnce } from "./db/demo.js";
import { migrate, pendingMigrations } from "./db/migrate.js";
import { type OpenDatabase, openDatabase } from "./db/open.js";
import { startRollupWorker } from "./db/rollup.js";
import { findServiceSecret } from "./db/secrets.js";
import { createMetrics, type MetricsSnapshot, renderMetrics, sumSnapshots } from "./metrics.js";
import { startServer } from "./server.js";
import { createKeysDriverService } from "./service/keys-driver.js";
import { createPageTokenCodec } from "./service/page-token.js";
import { createPostgresStore } from "./store.js";

// The executable: one process serving the port, or in worker mode (WORKERS
// above 1) a primary that owns the database set-up, the usage rollup and
// the workers' lives, and workers that serve.

/** A start-up problem the operator can fix; printed without a stack. */
class StartError extends Error {}

/** Messages between the primary and its workers. */
type WorkerMessage =
  | { readonly kind: "metrics"; readonly snapshot: MetricsSnapshot }
  | { readonly kind: "metrics-total"; readonly snapshot: MetricsSnapshot; readonly processes: number };

/**
 * Resolves on the first SIGINT or SIGTERM. The listeners stay: npm and a
 * terminal both deliver Ctrl-C, and a repeat must not fall through to Node's
 * default action (exit at once) while calls are draining.
 */
function shutdownSignal(): Promise<string> {
  return new Promise((resolve) => {
    for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, () => resolve(signal));
  });
}

/** Opens the database and makes sure its schema is current. */
async function prepareDatabase(config: Config): Promise<OpenDatabase> {
  const db = await openDatabase(config);
  try {
    if (db.embedded) {
      await migrate(db.sql);
      if (await loadDemoDataOnce(db.sql)) console.log("loaded the demo data set (3 tenants, 18 keys)");
    } else {
      const pending = await pendingMigrations(db.sql);
      if (pending.length > 0) {
        throw new StartError(
          `the database schema is behind: ${pending.length} migration(s) not applied (${pending.map((m) => m.file).join(", ")}).\n` +
            "Run `npm run migrate` with the same DATABASE_URL, then start again.",
        );
      }
    }
    return db;
  } catch (err) {
    await db.close();
    throw err;
  }
}

function startRollup(config: Config, sql: Sql) {
  if (config.rollupIntervalMs === 0) return undefined;
  return startRollupWorker(sql, {
    intervalMs: config.rollupIntervalMs,
    onError: (err) => console.error("usage rollup failed; retrying at the next interval:", err),
  });
}

/** Serves the port until a shutdown signal, then drains. */
async function serve(config: Config, sql: Sql, where: string, metricsText: (own: MetricsSnapshot) => string) {
  const secret = config.pageTokenSecret ?? (await findServiceSecret(sql, "page_token"));
  if (!secret) throw new StartError("the page token secret is missing from service_secrets; run `npm run migrate`");
  const metrics = createMetrics();
  const handlers = createKeysDriverService({
    store: createPostgresStore(sql),
    pageTokens: createPageTokenCodec(secret),
    metrics,
  });
  const server = await startServer({
    handlers,
    host: config.host,
    port: config.port,
    metricsText: () => metricsText(metrics.snapshot()),
  });
  if (cluster.isWorker) {
    const report = setInterval(
      () => process.send?.({ kind: "metrics", snapshot: metrics.snapshot() } satisfies WorkerMessage),
      1000,
    );
    report.unref();
  } else {
    console.log(
      `KeysDriverService listening on ${server.address} (gRPC over h2c; Connect and gRPC-Web over HTTP/1.1; database: ${where})`,
    );
    console.log("Try:");
    console.log(
      `  npx buf curl --schema proto --protocol grpc --http2-prior-knowledge \\\n    --data '{"tenantId":"${demoTenants.acme}","keyId":"${demoKeys.acmeProduction}"}' \\\n    http://${server.address}/keysdriver.v1.KeysDriverService/FetchKeyById`,
    );
  }
  const signal = await shutdownSignal();
  if (!cluster.isWorker) console.log(`${signal}: draining calls (up to ${config.shutdownGraceMs} ms), then stopping`);
  // A drain that hangs must not keep the process forever.
  setTimeout(() => {
    console.error("shutdown did not finish in time: exiting");
    process.exit(1);
  }, config.shutdownGraceMs + 10_000).unref();
  await server.close(config.shutdownGraceMs);
}

async function runSingle(config: Config): Promise<void> {
  const db = await prepareDatabase(config);
  const rollup = startRollup(config, db.sql);
  try {
    await serve(config, db.sql, db.embedded ? "embedded PostgreSQL" : "DATABASE_URL", (own) => renderMetrics(own, 1));
  } finally {
    await rollup?.stop();
    await db.close();
  }
  console.log("stopped");
}

async function runPrimary(config: Config): Promise<void> {
  const db = await prepareDatabase(config);
  const rollup = startRollup(config, db.sql);
  const snapshots = new Map<number, MetricsSnapshot>(); // kept after a worker exits: counters only grow
  let stopping = false;
  const fork = () => {
    // Workers use the database the primary prepared; the rollup runs here.
    const worker = cluster.fork({ DATABASE_URL: db.url, ROLLUP_INTERVAL_MS: "0" });
    worker.on("message", (m: WorkerMessage) => {
      if (m.kind === "metrics") snapshots.set(worker.id, m.snapshot);
    });
    return worker;
  };
  const workers = new Set<Worker>();
  for (let i = 0; i < config.workers; i++) workers.add(fork());
  cluster.on("exit", (dead, code, signal) => {
    workers.delete(dead);
    if (stopping) return;
    console.error(`worker ${dead.process.pid} exited (${signal ?? code}); starting another`);
    setTimeout(() => {
      if (!stopping) workers.add(fork());
    }, 1000);
  });
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
  console.log(
    `KeysDriverService: ${config.workers} workers on ${config.host}:${config.port} (database: ${db.embedded ? "embedded PostgreSQL" : "DATABASE_URL"})`,
  );

  const signal = await shutdownSignal();
  stopping = true;
  console.log(`${signal}: draining ${workers.size} workers, then stopping`);
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
  clearInterval(broadcast);
  await rollup?.stop();
  await db.close();
  console.log("stopped");
}

async function runWorker(config: Config): Promise<void> {
  const db = await openDatabase(config);
  let total: { snapshot: MetricsSnapshot; processes: number } | undefined;
  process.on("message", (m: WorkerMessage) => {
    if (m.kind === "metrics-total") total = m;
  });
  try {
    await serve(config, db.sql, "DATABASE_URL", (own) =>
      total ? renderMetrics(total.snapshot, total.processes) : renderMetrics(own, 1),
    );
  } finally {
    await db.close();
  }
  process.disconnect?.();
}

try {
  const config = loadConfig();
  if (cluster.isWorker) await runWorker(config);
  else if (config.workers > 1) await runPrimary(config);
  else await runSingle(config);
} catch (err) {
  if (err instanceof ConfigError || err instanceof StartError) {
    console.error(`keys-driver-service: ${err.message}`);
  } else {
    console.error("keys-driver-service failed:", err);
  }
  process.exitCode = 1;
}

import cluster from "node:cluster";
import { Registry } from "prom-client";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { type Config, loadConfig, StartError } from "./config.js";
import type { Sql } from "./db/client.js";
import { type PeriodicJob, startPeriodicJob } from "./jobs/periodic.js";
import { pruneKeyEvents } from "./jobs/prune-key-events.js";
import { rollUpClosedDays, rollupLagDays } from "./jobs/rollup.js";
import { createJobMetrics, type JobMetrics } from "./metrics.js";
import { type PreparedDatabase, prepareDatabase } from "./process/database.js";
import { listenForShutdown, type ShutdownRequest } from "./process/signals.js";
import { runWorker, runWorkers } from "./process/workers.js";
import { demoKeys, demoTenants } from "./schema/demo.js";
import { readAccessPolicy, readTlsMaterial } from "./security/tls.js";
import { startService } from "./service.js";

// The executable (`npm start`): prepare the database, run the background
// jobs, serve (here, or in worker processes) until asked to stop, then drain
// and stop in reverse order. stdout carries the JSON log (src/log.ts); the
// messages for people (the welcome, start-up and stop) go to stderr.

const name = "keys-driver-service";

/** The background jobs: the usage rollup and the retention of key changes (one process at a time does each). */
function startJobs(config: Config, sql: Sql, metrics: JobMetrics): PeriodicJob[] {
  const jobs: PeriodicJob[] = [];
  if (config.rollupIntervalMs > 0) {
    const rollUp = async () => {
      const run = await rollUpClosedDays(sql);
      const outcome = !run.ran ? "busy" : run.days.length > 0 ? "rolled" : "idle";
      metrics.rollupRan(outcome, run.days.length, await rollupLagDays(sql));
    };
    jobs.push(
      startPeriodicJob(rollUp, {
        intervalMs: config.rollupIntervalMs,
        onError: (err) => {
          metrics.rollupRan("failed", 0);
          console.error("usage rollup failed; retrying at the next interval:", err);
        },
      }),
    );
  }
  if (config.keyEventsRetentionDays > 0) {
    jobs.push(
      startPeriodicJob(() => pruneKeyEvents(sql, config.keyEventsRetentionDays), {
        intervalMs: 3_600_000,
        onError: (err) => console.error("pruning key changes failed; retrying in an hour:", err),
      }),
    );
  }
  return jobs;
}

function printWelcome(config: Config, address: string, db: PreparedDatabase, workers: number): void {
  const where = workers > 1 ? `${address}, ${workers} workers` : address;
  const database = db.embedded ? "embedded PostgreSQL" : "DATABASE_URL";
  const transport = !config.tls
    ? "gRPC over h2c; Connect and gRPC-Web over HTTP/1.1 and h2c"
    : `TLS${config.tls.clientCaFile ? " with client certificates" : ""}: gRPC over h2; Connect and gRPC-Web over HTTP/1.1 and h2`;
  console.error(`KeysDriverService listening on ${where} (${transport}; database: ${database})`);
  console.error("Try:");
  if (config.tls) {
    const client = config.tls.clientCaFile ? " --cert <client.pem> --key <client-key.pem>" : "";
    console.error(
      `  npx buf curl --protocol grpc --cacert <ca.pem>${client} \\\n    --list-methods https://${address}`,
    );
    return;
  }
  // The demo data is loaded into the embedded database only.
  const call = db.embedded
    ? `--data '{"tenantId":"${demoTenants.acme}","keyId":"${demoKeys.acmeProduction}"}' \\\n    http://${address}/keysdriver.v1.KeysDriverService/FetchKeyById`
    : `--list-methods http://${address}`;
  console.error(`  npx buf curl --protocol grpc --http2-prior-knowledge \\\n    ${call}`);
}

/** Serves in this process until a shutdown signal, then drains. */
async function serveHere(
  config: Config,
  db: PreparedDatabase,
  shutdown: ShutdownRequest,
  jobMetrics: JobMetrics,
): Promise<void> {
  const service = await startService(
    { ...config, databaseUrl: db.url },
    { metricsText: (own) => Registry.merge([own, jobMetrics.registry]).metrics() },
  );
  printWelcome(config, service.address, db, 1);
  const signal = await shutdown.requested;
  console.error(`${signal}: draining calls (up to ${config.shutdownGraceMs} ms), then stopping`);
  await service.close(config.shutdownGraceMs);
}

async function run(config: Config, shutdown: ShutdownRequest): Promise<void> {
  if (cluster.isWorker) return await runWorker(config, shutdown);
  // A TLS file or a policy that cannot be used stops the start here, before the database and any worker.
  if (config.tls) await readTlsMaterial(config.tls);
  if (config.authPolicyFile) await readAccessPolicy(config.authPolicyFile, [KeysDriverService]);
  const db = await prepareDatabase(config, { onNotice: (message) => console.error(`${name}: ${message}`) });
  const jobMetrics = createJobMetrics();
  const jobs = startJobs(config, db.sql, jobMetrics);
  try {
    if (shutdown.signal !== undefined) {
      console.error(`${shutdown.signal} during start-up: stopping`);
    } else if (config.workers > 1) {
      const welcome = (address: string) => printWelcome(config, address, db, config.workers);
      await runWorkers(config, db.url, shutdown, welcome, jobMetrics.registry);
    } else {
      await serveHere(config, db, shutdown, jobMetrics);
    }
  } finally {
    await Promise.all(jobs.map((job) => job.stop()));
    await db.close();
  }
  console.error("stopped");
}

const shutdown = listenForShutdown((signal) => {
  // The embedded database is told to stop by its exit handler.
  console.error(`${name}: ${signal} again: stopping now, without waiting for calls in flight`);
  process.exit(1);
});
try {
  const config = loadConfig();
  // A stop that hangs must not keep the process forever.
  shutdown.requested.then(() => {
    setTimeout(() => {
      console.error(`${name}: shutdown did not finish in time; exiting`);
      process.exit(1);
    }, config.shutdownGraceMs + 20_000).unref();
  });
  await run(config, shutdown);
  // Everything is closed; a timer left behind (an unreachable trace
  // collector's retries) must not hold the process.
  process.exit(process.exitCode ?? 0);
} catch (err) {
  if (err instanceof StartError) console.error(`${name}: ${err.message}`);
  else console.error(`${name} failed:`, err);
  // A worker's channel to the primary would keep it alive; its exit code tells the primary it failed.
  if (cluster.isWorker) process.exit(1);
  process.exitCode = 1;
}

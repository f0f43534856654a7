import cluster from "node:cluster";
import { type Config, loadConfig, StartError } from "./config.js";
import type { Sql } from "./db/client.js";
import { startRollupWorker } from "./jobs/rollup.js";
import { type PreparedDatabase, prepareDatabase } from "./process/database.js";
import { listenForShutdown, type ShutdownRequest } from "./process/signals.js";
import { runWorker, runWorkers } from "./process/workers.js";
import { demoKeys, demoTenants } from "./schema/demo.js";
import { startService } from "./service.js";

// The executable (`npm start`): prepare the database, run the background
// job, serve (here, or in worker processes) until asked to stop, then drain
// and stop in reverse order.

const name = "keys-driver-service";

function startRollup(config: Config, sql: Sql) {
  if (config.rollupIntervalMs === 0) return undefined;
  return startRollupWorker(sql, {
    intervalMs: config.rollupIntervalMs,
    onError: (err) => console.error("usage rollup failed; retrying at the next interval:", err),
  });
}

function printWelcome(address: string, db: PreparedDatabase): void {
  console.log(
    `KeysDriverService listening on ${address} (gRPC over h2c; Connect and gRPC-Web over HTTP/1.1; database: ${db.embedded ? "embedded PostgreSQL" : "DATABASE_URL"})`,
  );
  console.log("Try:");
  console.log(
    `  npx buf curl --schema proto --protocol grpc --http2-prior-knowledge \\\n    --data '{"tenantId":"${demoTenants.acme}","keyId":"${demoKeys.acmeProduction}"}' \\\n    http://${address}/keysdriver.v1.KeysDriverService/FetchKeyById`,
  );
}

/** Serves in this process until a shutdown signal, then drains. */
async function serveHere(config: Config, db: PreparedDatabase, shutdown: ShutdownRequest): Promise<void> {
  const service = await startService({ ...config, databaseUrl: db.url });
  printWelcome(service.address, db);
  const signal = await shutdown.requested;
  console.log(`${signal}: draining calls (up to ${config.shutdownGraceMs} ms), then stopping`);
  await service.close(config.shutdownGraceMs);
}

async function run(config: Config, shutdown: ShutdownRequest): Promise<void> {
  if (cluster.isWorker) return await runWorker(config, shutdown);
  const db = await prepareDatabase(config, { onNotice: (message) => console.log(`${name}: ${message}`) });
  const rollup = startRollup(config, db.sql);
  try {
    // A stop asked for during start-up ends the start here.
    if (shutdown.signal !== undefined) return;
    if (config.workers > 1) await runWorkers(config, db.url, shutdown);
    else await serveHere(config, db, shutdown);
  } finally {
    await rollup?.stop();
    await db.close();
  }
  console.log("stopped");
}

const shutdown = listenForShutdown();
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
} catch (err) {
  if (err instanceof StartError) console.error(`${name}: ${err.message}`);
  else console.error(`${name} failed:`, err);
  process.exitCode = 1;
}

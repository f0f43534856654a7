import { type Config, ConfigError, loadConfig } from "./config.js";
import { demoKeys, demoTenants, loadDemoDataOnce } from "./db/demo.js";
import { migrate, pendingMigrations } from "./db/migrate.js";
import { openDatabase } from "./db/open.js";
import { startRollupWorker } from "./db/rollup.js";
import { findServiceSecret } from "./db/secrets.js";
import { startServer } from "./server.js";
import { createKeysDriverService } from "./service/keys-driver.js";
import { createPageTokenCodec } from "./service/page-token.js";
import { createPostgresStore } from "./store.js";

/** Thrown for a start-up problem the operator can fix; printed without a stack. */
class StartError extends Error {}

async function run(config: Config): Promise<void> {
  const db = await openDatabase(config);
  let stopping = false;
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
    const secret = config.pageTokenSecret ?? (await findServiceSecret(db.sql, "page_token"));
    if (!secret) throw new StartError("the page token secret is missing from service_secrets; run `npm run migrate`");

    const handlers = createKeysDriverService({
      store: createPostgresStore(db.sql),
      pageTokens: createPageTokenCodec(secret),
    });
    const server = await startServer({ handlers, host: config.host, port: config.port });
    const rollup =
      config.rollupIntervalMs > 0
        ? startRollupWorker(db.sql, {
            intervalMs: config.rollupIntervalMs,
            onError: (err) => console.error("usage rollup failed; retrying at the next interval:", err),
          })
        : undefined;
    const where = db.embedded ? "embedded PostgreSQL" : "DATABASE_URL";
    console.log(
      `KeysDriverService listening on ${server.address} (gRPC over h2c, Connect and gRPC-Web over HTTP/1.1; database: ${where})`,
    );
    console.log("Try:");
    console.log(
      `  npx buf curl --schema proto --protocol grpc --http2-prior-knowledge \\\n    --data '{"tenantId":"${demoTenants.acme}","keyId":"${demoKeys.acmeProduction}"}' \\\n    http://${server.address}/keysdriver.v1.KeysDriverService/FetchKeyById`,
    );

    await new Promise<void>((resolve) => {
      // npm and a terminal both deliver Ctrl-C, so a signal may arrive twice:
      // repeats are ignored, and a hard deadline covers a stuck drain.
      const stop = (signal: string) => {
        if (stopping) return;
        stopping = true;
        console.log(`${signal}: draining calls (up to ${config.shutdownGraceMs} ms), then stopping`);
        setTimeout(() => {
          console.error("shutdown did not finish in time: exiting");
          process.exit(1);
        }, config.shutdownGraceMs + 10_000).unref();
        Promise.all([server.close(config.shutdownGraceMs), rollup?.stop()]).then(() => resolve(), resolve);
      };
      process.on("SIGINT", () => stop("SIGINT"));
      process.on("SIGTERM", () => stop("SIGTERM"));
    });
  } finally {
    await db.close();
  }
  console.log("stopped");
}

try {
  await run(loadConfig());
} catch (err) {
  if (err instanceof ConfigError || err instanceof StartError) {
    console.error(`keys-driver-service: ${err.message}`);
  } else {
    console.error("keys-driver-service failed to start:", err);
  }
  process.exitCode = 1;
}

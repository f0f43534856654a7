import { randomBytes } from "node:crypto";
import { chmod, mkdtemp } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { loadConfig } from "../../src/config.js";
import { createSql, type Sql } from "../../src/db/client.js";
import { type EmbeddedPostgres, startEmbeddedPostgres } from "../../src/process/embedded-postgres.js";
import { migrate } from "../../src/schema/migrate.js";

// One PostgreSQL server for the whole run: DATABASE_URL when set, otherwise
// an embedded one in a temporary folder. Each suite gets its own database.
let server: Promise<{ adminUrl: string; embedded?: EmbeddedPostgres }> | undefined;

function startServerOnce() {
  server ??= (async () => {
    const url = process.env.DATABASE_URL;
    if (url) return { adminUrl: url };
    const folder = await mkdtemp(path.join(os.tmpdir(), "keys-driver-test-"));
    // As root the server runs as the postgres user, who must reach the folder.
    await chmod(folder, 0o755);
    const dataDir = path.join(folder, "pg");
    const embedded = await startEmbeddedPostgres({
      dataDir,
      port: 0,
      persistent: false,
      stageDir: loadConfig().embeddedStageDir,
    });
    return { adminUrl: embedded.url, embedded };
  })();
  return server;
}

/** Stops the embedded server, if the run started one. */
export async function stopTestServer(): Promise<void> {
  if (!server) return;
  const { embedded } = await server;
  await embedded?.stop();
  server = undefined;
}

function withDatabase(url: string, database: string): string {
  const u = new URL(url);
  u.pathname = `/${database}`;
  return u.toString();
}

/** A fresh database of its own, for one suite. */
export interface TestDatabase {
  readonly url: string;
  readonly sql: Sql;
  /** Closes the pool and drops the database. */
  drop(): Promise<void>;
}

/** Creates a new, empty database; migrated unless `migrated: false`. */
export async function createTestDatabase(options: { migrated?: boolean } = {}): Promise<TestDatabase> {
  const { adminUrl } = await startServerOnce();
  const name = `keys_test_${randomBytes(6).toString("hex")}`;
  const admin = createSql({ url: adminUrl, poolMax: 1, statementTimeoutMs: 0 });
  await admin`create database ${admin(name)}`;
  await admin.end();
  const url = withDatabase(adminUrl, name);
  // Another application: its changes wake the feed through the database, as an operator's SQL would.
  const sql = createSql({ url, poolMax: 20, statementTimeoutMs: 30_000, applicationName: "keys-driver-tests" });
  if (options.migrated !== false) await migrate(sql);
  return {
    url,
    sql,
    async drop() {
      await sql.end({ timeout: 5 });
      const admin = createSql({ url: adminUrl, poolMax: 1, statementTimeoutMs: 0 });
      await admin`drop database if exists ${admin(name)} with (force)`;
      await admin.end();
    },
  };
}

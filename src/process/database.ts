import { type Config, StartError } from "../config.js";
import { createSql, type Sql } from "../db/client.js";
import { loadDemoDataOnce } from "../schema/demo.js";
import { migrate, pendingMigrations } from "../schema/migrate.js";
import { type EmbeddedPostgres, startEmbeddedPostgres } from "./embedded-postgres.js";

/** The database this process prepared, and how to let go of it. */
export interface PreparedDatabase {
  readonly sql: Sql;
  /** The connection URL, for the service and for other processes. */
  readonly url: string;
  /** Set when the database is the embedded one this process started. */
  readonly embedded: EmbeddedPostgres | undefined;
  /** Closes the pool, then stops the embedded server if there is one. */
  close(): Promise<void>;
}

const embeddedDatabaseName = "keys";

/**
 * Connects to DATABASE_URL, or, without one, starts the embedded PostgreSQL
 * (creating its `keys` database the first time) and connects to that.
 */
export async function openDatabase(
  config: Config,
  options: { readonly onNotice?: (message: string) => void } = {},
): Promise<PreparedDatabase> {
  let embedded: EmbeddedPostgres | undefined;
  let url = config.databaseUrl;
  if (url === undefined) {
    embedded = await startEmbeddedPostgres({
      dataDir: config.embeddedDataDir,
      port: config.embeddedPort,
      stageDir: config.embeddedStageDir,
      persistent: true,
      onNotice: options.onNotice,
    });
    try {
      const admin = createSql({ url: embedded.url, poolMax: 1, statementTimeoutMs: 0 });
      try {
        const [exists]: [{ datname: string }?] = await admin`
          select datname
          from pg_database
          where datname = ${embeddedDatabaseName}
        `;
        if (!exists) await admin`create database ${admin(embeddedDatabaseName)}`;
      } finally {
        await admin.end();
      }
    } catch (err) {
      await embedded.stop();
      throw err;
    }
    url = embedded.urlFor(embeddedDatabaseName);
  }
  const sql = createSql({ url, poolMax: config.poolMax, statementTimeoutMs: config.statementTimeoutMs });
  return {
    sql,
    url,
    embedded,
    async close() {
      await sql.end({ timeout: 5 });
      await embedded?.stop();
    },
  };
}

/**
 * Opens the database and makes sure its schema is current: the embedded
 * database is migrated (and given the demo data the first time); a
 * DATABASE_URL whose schema is behind stops the start with what to run.
 */
export async function prepareDatabase(
  config: Config,
  options: { readonly onNotice?: (message: string) => void } = {},
): Promise<PreparedDatabase> {
  const db = await openDatabase(config, options);
  try {
    if (db.embedded) {
      await migrate(db.sql);
      if (await loadDemoDataOnce(db.sql)) options.onNotice?.("loaded the demo data set (3 tenants, 18 keys)");
    } else {
      const pending = await pendingMigrations(db.sql);
      if (pending.length > 0) {
        throw new StartError(
          `the database schema is behind: ${pending.length} migration(s) not applied (${pending.map((m) => m.file).join(", ")}). ` +
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

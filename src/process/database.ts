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

const connectionProblems: Record<string, string> = {
  ECONNREFUSED: "nothing listens there",
  ENOTFOUND: "the host name does not resolve",
  EAI_AGAIN: "the host name does not resolve",
  EHOSTUNREACH: "the host cannot be reached",
  CONNECT_TIMEOUT: "it did not answer in time",
  "28P01": "the password was refused",
  "28000": "the role is unknown or not allowed in (pg_hba.conf)",
  "3D000": "the database does not exist",
};

/**
 * Checks that the database at `url` answers, turning the usual failures (no
 * server, wrong host, password, role or database, TLS) into one line that
 * says which, without the password.
 */
export async function checkReachable(sql: Sql, url: string): Promise<void> {
  try {
    await sql`select 1`;
  } catch (err) {
    const where = new URL(url);
    const target = `${where.hostname}:${where.port || 5432}${where.pathname}`;
    const code = (err as { code?: string }).code ?? "";
    const problem =
      connectionProblems[code] ?? (/ssl|tls/i.test(String(err)) ? `TLS failed (${(err as Error).message})` : undefined);
    if (problem === undefined) throw err;
    throw new StartError(`cannot use the database at ${target}: ${problem}; check DATABASE_URL`, { cause: err });
  }
}
/** How openDatabase and prepareDatabase work. */
export interface OpenOptions {
  /** Told what the start did that the operator should know. */
  readonly onNotice?: (message: string) => void;
  /**
   * Connections in this pool: the start-up work and the background jobs
   * (the service has its own pool of DATABASE_POOL_MAX). Default 2.
   */
  readonly poolMax?: number;
}

/**
 * Connects to DATABASE_URL, or, without one, starts the embedded PostgreSQL
 * (creating its `keys` database the first time) and connects to that.
 */
export async function openDatabase(config: Config, options: OpenOptions = {}): Promise<PreparedDatabase> {
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
  const sql = createSql({
    url,
    poolMax: options.poolMax ?? 2,
    statementTimeoutMs: config.statementTimeoutMs,
    connectTimeoutSeconds: 10,
  });
  if (!embedded) {
    try {
      await checkReachable(sql, url);
    } catch (err) {
      await sql.end({ timeout: 1 });
      throw err;
    }
  }
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
export async function prepareDatabase(config: Config, options: OpenOptions = {}): Promise<PreparedDatabase> {
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

import type { Config } from "../config.js";
import { createSql, type Sql } from "./client.js";
import { type EmbeddedDatabase, startEmbeddedPostgres } from "./embedded.js";

/** The database the process runs on, and how to let go of it. */
export interface OpenDatabase {
  readonly sql: Sql;
  /** The connection URL, for other processes. */
  readonly url: string;
  /** Set when the database is the embedded one this process started. */
  readonly embedded: EmbeddedDatabase | undefined;
  /** Closes the pool, then stops the embedded server if there is one. */
  close(): Promise<void>;
}

const embeddedDatabaseName = "keys";

/**
 * Connects to DATABASE_URL, or, without one, starts the embedded PostgreSQL
 * (creating its `keys` database the first time) and connects to that.
 */
export async function openDatabase(config: Config): Promise<OpenDatabase> {
  let embedded: EmbeddedDatabase | undefined;
  let url = config.databaseUrl;
  if (url === undefined) {
    embedded = await startEmbeddedPostgres({
      dataDir: config.embeddedDataDir,
      port: config.embeddedPort,
      persistent: true,
    });
    const admin = createSql({ url: embedded.url, poolMax: 1, statementTimeoutMs: 0 });
    const [exists]: [{ datname: string }?] = await admin`
      select datname
      from pg_database
      where datname = ${embeddedDatabaseName}
    `;
    if (!exists) await admin`create database ${admin(embeddedDatabaseName)}`;
    await admin.end();
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

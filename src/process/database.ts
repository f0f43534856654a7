import { randomBytes } from "node:crypto";
import { type Config, StartError, serviceRole } from "../config.js";
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

/** The embedded database's login for the service: a member of its role, with a new password each start. */
const embeddedServiceLogin = async (sql: Sql, superuserUrl: string, role: string): Promise<string> => {
  const login = "keys_driver_app";
  const password = randomBytes(24).toString("base64url");
  await sql.begin(async (tx) => {
    const [exists]: [{ found: boolean }?] = await tx`select true as found from pg_roles where rolname = ${login}`;
    if (!exists) await tx`create role ${tx(login)} login`;
    await tx`grant ${tx(role)} to ${tx(login)}`;
    // A generated base64url string: nothing in it needs quoting.
    await tx.unsafe(`alter role ${login} password '${password}'`);
  });
  const url = new URL(superuserUrl);
  url.username = login;
  url.password = password;
  return url.toString();
};

/**
 * The pending migrations, read by the first of `pools` allowed to: the login
 * may have no right of its own (a member of the service's role), and the
 * role none yet (a database migrated before migration 0007).
 */
async function pendingMigrationsAsAnyOf(pools: Sql[]): Promise<Awaited<ReturnType<typeof pendingMigrations>>> {
  for (const pool of pools) {
    try {
      return await pendingMigrations(pool);
    } catch (err) {
      if ((err as { code?: string }).code !== "42501") throw err;
    }
  }
  throw new StartError(
    "neither DATABASE_URL's user nor DATABASE_ROLE may read schema_migrations: run `npm run migrate` as the database's owner",
  );
}

/**
 * A pool on `url` that acts as `role` (DATABASE_ROLE), checked: a user that
 * may not act as it, or a role that does not exist, stops the start with
 * what to grant.
 */
async function openAsRole(url: string, role: string, config: Config, options: OpenOptions = {}): Promise<Sql> {
  const sql = createSql({
    url,
    poolMax: options.poolMax ?? 2,
    statementTimeoutMs: config.statementTimeoutMs,
    connectTimeoutSeconds: 10,
    role,
  });
  try {
    await sql`select 1`;
    return sql;
  } catch (err) {
    await sql.end({ timeout: 1 });
    const code = (err as { code?: string }).code;
    const user = decodeURIComponent(new URL(url).username) || "(the URL's default user)";
    if (code === "22023") {
      throw new StartError(
        role === serviceRole
          ? `the role ${role} (DATABASE_ROLE) does not exist; run \`npm run migrate\` as the database's owner, which creates it`
          : `the role ${role} (DATABASE_ROLE) does not exist; create it, or leave DATABASE_ROLE unset for ${serviceRole}, which \`npm run migrate\` creates`,
      );
    }
    if (code === "42501") {
      throw new StartError(
        `DATABASE_URL's user ${user} may not act as ${role} (DATABASE_ROLE); as the owner, run: grant ${role} to ${user}`,
      );
    }
    throw err;
  }
}

/**
 * Opens the database and makes sure its schema is current: the embedded
 * database is migrated (and given the demo data the first time); a
 * DATABASE_URL whose schema is behind stops the start with what to run.
 * The pool it returns acts as DATABASE_ROLE (the background jobs use it);
 * migrations ran as the URL's user, the owner.
 */
export async function prepareDatabase(config: Config, options: OpenOptions = {}): Promise<PreparedDatabase> {
  const db = await openDatabase(config, options);
  let asRole: Sql | undefined;
  try {
    if (db.embedded) {
      await migrate(db.sql);
      if (await loadDemoDataOnce(db.sql)) options.onNotice?.("loaded the demo data set (3 tenants, 18 keys)");
    }
    // The embedded database's URL names its superuser; the service logs in
    // as a login of its own instead, which can act as the service's role
    // and nothing more.
    const role = config.databaseRole;
    const url = role !== undefined && db.embedded ? await embeddedServiceLogin(db.sql, db.url, role) : db.url;
    asRole = role === undefined ? undefined : await openAsRole(url, role, config, options);
    if (!db.embedded) {
      // Acting as the role, a superuser or owner login could still leave it (RESET ROLE): say so.
      const [login]: [{ name: string; mighty: boolean }?] = await db.sql`
        select session_user as name, rolsuper or (select current_user = tableowner from pg_tables where tablename = 'api_keys' limit 1) as mighty
        from pg_roles
        where rolname = session_user
      `;
      if (asRole && login?.mighty) {
        options.onNotice?.(
          `DATABASE_URL logs in as ${login.name}, a superuser or the tables' owner: the service acts as ${role}, but for least privilege give it a login of its own (README, "Your own PostgreSQL")`,
        );
      }
      const pending = await pendingMigrationsAsAnyOf([db.sql, ...(asRole ? [asRole] : [])]);
      if (pending.length > 0) {
        throw new StartError(
          `the database schema is behind: ${pending.length} migration(s) not applied (${pending.map((m) => m.file).join(", ")}). ` +
            "Run `npm run migrate` with the same DATABASE_URL, then start again.",
        );
      }
    }
    if (asRole === undefined) return db;
    const sql = asRole;
    await db.sql.end({ timeout: 5 });
    return {
      ...db,
      url,
      sql,
      close: async () => {
        await sql.end({ timeout: 5 });
        await db.embedded?.stop();
      },
    };
  } catch (err) {
    await asRole?.end({ timeout: 1 });
    await db.close();
    throw err;
  }
}

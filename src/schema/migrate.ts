import { readdir, readFile } from "node:fs/promises";
import type { Sql } from "../db/client.js";

const migrationsDir = new URL("./migrations/", import.meta.url);

/** Serialises migration runs across processes; an arbitrary constant. */
const migrationLockKey = 7_301_944_512n;

/** A versioned .sql file. */
export interface Migration {
  readonly version: number;
  readonly name: string;
  readonly file: string;
}

/** The migrations this build knows, in the order they apply. */
export async function listMigrations(): Promise<Migration[]> {
  const files = (await readdir(migrationsDir)).filter((f) => f.endsWith(".sql")).sort();
  return files.map((file) => {
    const match = /^(\d+)_(.+)\.sql$/.exec(file);
    if (!match) throw new Error(`migration file name must be NNNN_name.sql: ${file}`);
    return { version: Number(match[1]), name: match[2] ?? file, file };
  });
}

async function appliedVersions(sql: Sql): Promise<Set<number>> {
  const [table]: [{ exists: boolean }?] = await sql`
    select to_regclass('schema_migrations') is not null as exists
  `;
  if (!table?.exists) return new Set();
  const rows: { version: number }[] = await sql`
    select version
    from schema_migrations
  `;
  return new Set(rows.map((r) => r.version));
}

/** The migrations this build knows that the database has not applied. */
export async function pendingMigrations(sql: Sql): Promise<Migration[]> {
  const applied = await appliedVersions(sql);
  return (await listMigrations()).filter((m) => !applied.has(m.version));
}

/**
 * Applies every pending migration, each in its own transaction, in order.
 * Safe to run twice and from several processes at once: an advisory lock
 * serialises runs, and each migration is re-checked under the lock.
 * Returns the migrations it applied.
 */
export async function migrate(sql: Sql): Promise<Migration[]> {
  // "create table if not exists" is not safe against itself running
  // concurrently, so it too runs under the lock.
  await sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(${migrationLockKey.toString()}::int8)`;
    await tx`
      create table if not exists schema_migrations (
        version integer primary key,
        name text not null,
        applied_at timestamptz not null default now()
      )
    `;
  });
  const applied: Migration[] = [];
  for (const migration of await listMigrations()) {
    const ran = await sql.begin(async (tx) => {
      await tx`select pg_advisory_xact_lock(${migrationLockKey.toString()}::int8)`;
      const [done]: [{ version: number }?] = await tx`
        select version
        from schema_migrations
        where version = ${migration.version}
      `;
      if (done) return false;
      const text = await readFile(new URL(migration.file, migrationsDir), "utf8");
      // A migration that fills a table takes as long as the data asks (0006:
      // about a minute on the bench data set), not the rpcs' statement limit.
      await tx`set local statement_timeout = 0`;
      // The file is ours, not a caller's: running it verbatim is the point.
      await tx.unsafe(text).simple();
      await tx`
        insert into schema_migrations (version, name)
        values (${migration.version}, ${migration.name})
      `;
      return true;
    });
    if (ran) applied.push(migration);
  }
  return applied;
}

import { loadConfig } from "../src/config.js";
import { openDatabase, type PreparedDatabase } from "../src/process/database.js";

/**
 * The benchmark's database: DATABASE_URL when set, else an embedded
 * PostgreSQL of its own in .data/bench (kept, so the data set is made once).
 */
export async function openBenchDatabase(): Promise<PreparedDatabase> {
  const config = loadConfig({ ...process.env, EMBEDDED_PG_DIR: process.env.BENCH_PG_DIR || ".data/bench" });
  return await openDatabase({ ...config, statementTimeoutMs: 0 }, { poolMax: 4 });
}

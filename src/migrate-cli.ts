import { ConfigError, loadConfig } from "./config.js";
import { migrate } from "./db/migrate.js";
import { openDatabase } from "./db/open.js";

// `npm run migrate`: applies pending migrations to DATABASE_URL (or to the
// embedded database when it is unset) and says what it did.
try {
  const db = await openDatabase(loadConfig());
  try {
    const applied = await migrate(db.sql);
    console.log(applied.length === 0 ? "schema is up to date" : `applied: ${applied.map((m) => m.file).join(", ")}`);
  } finally {
    await db.close();
  }
} catch (err) {
  console.error(err instanceof ConfigError ? `migrate: ${err.message}` : err);
  process.exitCode = 1;
}

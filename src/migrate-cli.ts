import { loadConfig, StartError } from "./config.js";
import { openDatabase } from "./process/database.js";
import { migrate } from "./schema/migrate.js";

// `npm run migrate`: applies pending migrations to DATABASE_URL (or to the
// embedded database when it is unset) and says what it did.
try {
  const db = await openDatabase(loadConfig(), { onNotice: (message) => console.log(`migrate: ${message}`) });
  try {
    const applied = await migrate(db.sql);
    console.log(applied.length === 0 ? "schema is up to date" : `applied: ${applied.map((m) => m.file).join(", ")}`);
  } finally {
    await db.close();
  }
} catch (err) {
  // A migration the database refused (a missing right, a role to create) is one line, with PostgreSQL's hint.
  const refused = err as { name?: string; message?: string; hint?: string };
  if (err instanceof StartError) console.error(`migrate: ${err.message}`);
  else if (refused.name === "PostgresError")
    console.error(`migrate: ${refused.message}${refused.hint ? `. ${refused.hint}` : ""}`);
  else console.error(err);
  process.exitCode = 1;
}

// `npm run seed [-- --small]`: loads the benchmark data set into
// DATABASE_URL, or into the benchmark's embedded PostgreSQL.
import { migrate } from "../src/schema/migrate.js";
import { openBenchDatabase } from "./database.js";
import { benchScale, seed, smallScale } from "./seed.js";

const db = await openBenchDatabase();
try {
  await migrate(db.sql);
  await seed(db.sql, process.argv.includes("--small") ? smallScale : benchScale);
} finally {
  await db.close();
}

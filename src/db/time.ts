import { type Micros, splitMicros } from "../micros.js";
import type { Sql } from "./client.js";

/**
 * A SQL expression for the timestamptz at `us` microseconds since the
 * epoch, exact over the whole timestamp range: whole seconds through
 * to_timestamp (exact for integers) plus the microseconds as an interval.
 * Parameters go this way rather than through a JS Date, whose milliseconds
 * would drop PostgreSQL's precision; the other way is the database's
 * epoch_micros function (migration 0003).
 */
export function timestampAt(sql: Sql, us: Micros) {
  const { seconds, micros } = splitMicros(us);
  return sql`(to_timestamp(${seconds.toString()}::int8) + ${micros.toString()}::int8 * interval '1 microsecond')`;
}

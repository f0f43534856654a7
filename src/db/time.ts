import { type Micros, splitMicros } from "../micros.js";
import type { Sql } from "./client.js";

export type { Micros };

/**
 * A SQL expression for the timestamptz at `us`, exact over the whole
 * timestamp range: whole seconds through to_timestamp (exact for integers)
 * plus the microseconds as an interval.
 */
export function timestampAt(sql: Sql, us: Micros) {
  const { seconds, micros } = splitMicros(us);
  return sql`(to_timestamp(${seconds.toString()}::int8) + ${micros.toString()}::int8 * interval '1 microsecond')`;
}

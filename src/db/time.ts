import type { Sql } from "./client.js";

/**
 * An instant as whole microseconds since the Unix epoch: PostgreSQL's own
 * precision, carried without a lossy float.
 */
export type Micros = bigint;

const perSecond = 1_000_000n;

/**
 * A SQL expression for the timestamptz at `us`, exact over the whole
 * timestamp range: whole seconds through to_timestamp (exact for integers)
 * plus the microseconds as an interval.
 */
export function timestampAt(sql: Sql, us: Micros) {
  let seconds = us / perSecond;
  if (us % perSecond < 0n) seconds -= 1n;
  const micros = us - seconds * perSecond;
  return sql`(to_timestamp(${seconds.toString()}::int8) + ${micros.toString()}::int8 * interval '1 microsecond')`;
}

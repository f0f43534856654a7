/**
 * An instant as whole microseconds since the Unix epoch: PostgreSQL's own
 * precision, carried as a bigint so that nothing passes through a lossy float.
 */
export type Micros = bigint;

const perSecond = 1_000_000n;

/**
 * Whole seconds (rounded down, also before 1970) and the microseconds past
 * them (0 to 999,999): the two parts both PostgreSQL's to_timestamp and
 * protobuf's Timestamp are built from.
 */
export function splitMicros(us: Micros): { readonly seconds: bigint; readonly micros: bigint } {
  let seconds = us / perSecond;
  if (us % perSecond < 0n) seconds -= 1n;
  return { seconds, micros: us - seconds * perSecond };
}

import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { invalidArgument } from "../errors.js";
import type { Micros } from "../micros.js";

const uuidPattern = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A required UUID field, lower-cased; INVALID_ARGUMENT naming `field` otherwise. */
export function requireUuid(field: string, value: string): string {
  if (value === "") throw invalidArgument(field, "is required");
  if (!uuidPattern.test(value)) throw invalidArgument(field, "must be a UUID");
  return value.toLowerCase();
}

/** A non-negative int32 field. */
export function requireNonNegative(field: string, value: number): number {
  if (value < 0) throw invalidArgument(field, "must not be negative");
  return value;
}

/** How many characters (Unicode code points, not UTF-16 units) `value` holds. */
function characterCount(value: string): number {
  let count = 0;
  for (const _ of value) count++;
  return count;
}

/** An optional free-text field: null when empty, at most `maxLength` characters. */
export function optionalText(field: string, value: string, maxLength: number): string | null {
  if (value === "") return null;
  // Only a string longer in UTF-16 units can be longer in characters.
  if (value.length > maxLength && characterCount(value) > maxLength) {
    throw invalidArgument(field, `must be at most ${maxLength} characters`);
  }
  if (value.includes("\u0000")) throw invalidArgument(field, "must not contain NUL characters");
  return value;
}

// The range google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31.
const minSeconds = -62_135_596_800n;
const maxSeconds = 253_402_300_799n;

/**
 * A Timestamp as exact microseconds; nanoseconds below a microsecond are
 * truncated. Undefined when unset; INVALID_ARGUMENT when out of range.
 */
export function optionalTimestamp(field: string, value: Timestamp | undefined): Micros | undefined {
  if (value === undefined) return undefined;
  if (value.seconds < minSeconds || value.seconds > maxSeconds) {
    throw invalidArgument(field, "must be between 0001-01-01 and 9999-12-31");
  }
  if (value.nanos < 0 || value.nanos > 999_999_999) {
    throw invalidArgument(field, "nanos must be between 0 and 999999999");
  }
  return value.seconds * 1_000_000n + BigInt(Math.floor(value.nanos / 1000));
}

/** A required Timestamp as exact microseconds. */
export function requireTimestamp(field: string, value: Timestamp | undefined): Micros {
  const micros = optionalTimestamp(field, value);
  if (micros === undefined) throw invalidArgument(field, "is required");
  return micros;
}

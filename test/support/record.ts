import { appendFileSync } from "node:fs";

/**
 * Notes what a test saw, for `npm run reliability` to publish
 * (docs/RELIABILITY.md): a JSON line appended to the file RELIABILITY_RECORD
 * names; nothing when it is unset.
 */
export function recordObservation(entry: Record<string, unknown>): void {
  const file = process.env.RELIABILITY_RECORD;
  if (file) appendFileSync(file, `${JSON.stringify(entry, (_k, v) => (typeof v === "bigint" ? String(v) : v))}\n`);
}

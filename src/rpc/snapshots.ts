import { create } from "@bufbuild/protobuf";
import { type Timestamp, TimestampSchema } from "@bufbuild/protobuf/wkt";
import {
  type KeySnapshot,
  KeySnapshotSchema,
  KeyStatus,
  type KeyUsageSnapshot,
  KeyUsageSnapshotSchema,
} from "../../gen/keysdriver/v1/keys_driver_pb.js";
import type { KeyRow, UsageRow } from "../db/store.js";
import { type Micros, splitMicros } from "../micros.js";
import { formatEtag } from "./etag.js";

const statuses = {
  active: KeyStatus.ACTIVE,
  revoked: KeyStatus.REVOKED,
  expired: KeyStatus.EXPIRED,
} as const;

// Snapshots are built on every read, often 50 or more to a call, so they are
// written as the plain message objects protobuf-es uses (every field set, and
// $typeName) rather than through create()'s reflection; the types check that
// no field is missing.

/** Exact microseconds as a protobuf Timestamp. */
export function timestampFromMicros(us: Micros): Timestamp {
  const { seconds, micros } = splitMicros(us);
  return { $typeName: TimestampSchema.typeName, seconds, nanos: Number(micros) * 1000 };
}

function optionalTimestamp(us: Micros | null): Timestamp | undefined {
  return us === null ? undefined : timestampFromMicros(us);
}

/** The caller's view of a key row. */
export function keySnapshot(row: KeyRow): KeySnapshot {
  return {
    $typeName: KeySnapshotSchema.typeName,
    id: row.id,
    tenantId: row.tenant_id,
    name: row.name,
    keyPrefix: row.key_prefix,
    status: statuses[row.status] ?? KeyStatus.UNSPECIFIED,
    isFrozen: row.is_frozen,
    frozenAt: optionalTimestamp(row.frozen_at_us),
    createdAt: timestampFromMicros(row.created_at_us),
    lastUsedAt: optionalTimestamp(row.last_used_at_us),
    expiresAt: optionalTimestamp(row.expires_at_us),
    totalRequests: row.total_requests,
    etag: formatEtag(row.id, row.version),
    freezeReason: row.freeze_reason ?? "",
    freezeActor: row.freeze_actor ?? "",
  };
}

/** The caller's view of a usage sum. */
export function usageSnapshot(keyId: string, row: UsageRow): KeyUsageSnapshot {
  return create(KeyUsageSnapshotSchema, {
    keyId,
    since: timestampFromMicros(row.since_us),
    until: timestampFromMicros(row.until_us),
    requestCount: row.request_count,
    spendCents: row.spend_cents,
    spendCentsExact: row.spend_cents_exact,
  });
}

import { createHash, randomUUID } from "node:crypto";
import type { Sql } from "../../src/db/client.js";

/** A key to insert; everything but the tenant has a default. */
export interface KeyFixture {
  tenantId: string;
  id?: string;
  name?: string;
  keyPrefix?: string;
  status?: "active" | "revoked" | "expired";
  isFrozen?: boolean;
  /** timestamptz text, e.g. "2026-01-02 03:04:05.123456+00". */
  frozenAt?: string;
  createdAt?: string;
  lastUsedAt?: string;
  expiresAt?: string;
  totalRequests?: bigint;
}

// Timestamps go in as text: postgres.js would pass a timestamptz parameter
// through a JS Date and lose the microseconds.

/** Inserts a key straight into api_keys and returns its id. */
export async function insertKey(sql: Sql, key: KeyFixture): Promise<string> {
  const id = key.id ?? randomUUID();
  const frozen = key.isFrozen ?? false;
  await sql`
    insert into api_keys (
      tenant_id, id, name, key_prefix, key_hash, status, is_frozen, frozen_at,
      created_at, last_used_at, expires_at, total_requests
    )
    values (
      ${key.tenantId}, ${id}, ${key.name ?? ""}, ${key.keyPrefix ?? "sk_test_0000"},
      ${createHash("sha256").update(id).digest()}, ${key.status ?? "active"}, ${frozen},
      ${frozen ? (key.frozenAt ?? "2026-01-01 00:00:00+00") : null}::text::timestamptz,
      ${key.createdAt === undefined ? sql`clock_timestamp()` : sql`${key.createdAt}::text::timestamptz`},
      ${key.lastUsedAt ?? null}::text::timestamptz,
      ${key.expiresAt ?? null}::text::timestamptz, ${(key.totalRequests ?? 0n).toString()}::int8
    )
  `;
  return id;
}

/** Inserts `count` keys of one tenant, all created at the same instant. */
export async function insertKeysAt(sql: Sql, tenantId: string, createdAt: string, count: number): Promise<void> {
  await sql`
    insert into api_keys (tenant_id, id, key_prefix, key_hash, created_at)
    select ${tenantId}, gen_random_uuid(), 'sk_test_0000', sha256(n::text::bytea), ${createdAt}::text::timestamptz
    from generate_series(1, ${count}) as n
  `;
}

/** Inserts proxy calls of one key: each with a cost (numeric text) and a time. */
export async function insertCalls(
  sql: Sql,
  tenantId: string,
  keyId: string,
  calls: readonly { costCents: string; at: string }[],
): Promise<void> {
  for (const call of calls) {
    await sql`
      insert into proxy_calls (tenant_id, api_key_id, cost_cents, created_at)
      values (${tenantId}, ${keyId}, ${call.costCents}::numeric, ${call.at}::text::timestamptz)
    `;
  }
}

/** A new random tenant id. */
export const newTenant = (): string => randomUUID();

/**
 * A small deterministic random generator (numbers in [0, 1)), so that a
 * failing random case can be replayed from its seed.
 */
export function generator(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

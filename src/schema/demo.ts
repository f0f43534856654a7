import { createHash, randomBytes } from "node:crypto";
import { arrayLiteral, type Sql } from "../db/client.js";

/** The demo tenants, fixed so that the README's commands work as written. */
export const demoTenants = {
  acme: "11111111-1111-4111-8111-111111111111",
  globex: "22222222-2222-4222-8222-222222222222",
  initech: "33333333-3333-4333-8333-333333333333",
} as const;

/** A few demo keys with fixed ids, for the README's commands. */
export const demoKeys = {
  acmeProduction: "aaaaaaaa-0000-4000-8000-000000000001",
  acmeFrozen: "aaaaaaaa-0000-4000-8000-000000000002",
  globexProduction: "bbbbbbbb-0000-4000-8000-000000000001",
} as const;

interface DemoKey {
  tenant_id: string;
  id: string;
  name: string;
  status: "active" | "revoked" | "expired";
  frozen: boolean;
  ageDays: number;
  expiresInDays: number | null;
}

function keysOf(tenantId: string, idPrefix: string): DemoKey[] {
  const key = (n: number, name: string, more: Partial<DemoKey> = {}): DemoKey => ({
    tenant_id: tenantId,
    id: `${idPrefix}-0000-4000-8000-${n.toString().padStart(12, "0")}`,
    name,
    status: "active",
    frozen: false,
    ageDays: 90 - n * 7,
    expiresInDays: null,
    ...more,
  });
  return [
    key(1, "production"),
    key(2, "leaked in a public repo", { frozen: true }),
    key(3, "staging"),
    key(4, "old CI key", { status: "revoked" }),
    key(5, "trial", { status: "expired", expiresInDays: -3 }),
    key(6, "batch jobs", { expiresInDays: 30 }),
  ];
}

/**
 * Loads the demo data set (three tenants, keys in every state, a month of
 * usage) if the database has no keys yet. Returns whether it loaded it.
 */
export async function loadDemoDataOnce(sql: Sql): Promise<boolean> {
  return await sql.begin(async (tx) => {
    // One loader at a time; the second finds the keys the first wrote.
    await tx`lock table api_keys in exclusive mode`;
    const [any]: [{ id: string }?] = await tx`
      select id
      from api_keys
      limit 1
    `;
    if (any) return false;

    const keys = [
      ...keysOf(demoTenants.acme, "aaaaaaaa"),
      ...keysOf(demoTenants.globex, "bbbbbbbb"),
      ...keysOf(demoTenants.initech, "cccccccc"),
    ];
    for (const k of keys) {
      const secret = `sk_live_${randomBytes(24).toString("base64url")}`;
      await tx`
        insert into api_keys (
          tenant_id, id, name, key_prefix, key_hash, status, permissions,
          rate_limit_per_minute, is_frozen, frozen_at, freeze_reason, freeze_actor,
          revoked_at, revoked_reason, created_at, expires_at
        )
        values (
          ${k.tenant_id}, ${k.id}, ${k.name}, ${secret.slice(0, 12)},
          ${createHash("sha256").update(secret).digest()}, ${k.status}, ${arrayLiteral(["chat:write", "models:read"])}::text[],
          ${600}, ${k.frozen}, ${k.frozen ? sql`now() - interval '2 hours'` : null},
          ${k.frozen ? "secret found in a public repository" : null}, ${k.frozen ? "security-bot" : null},
          ${k.status === "revoked" ? sql`now() - interval '10 days'` : null},
          ${k.status === "revoked" ? "rotated" : null},
          now() - ${k.ageDays} * interval '1 day',
          ${k.expiresInDays === null ? null : sql`now() + ${k.expiresInDays} * interval '1 day'`}
        )
      `;
    }

    // A month of calls for the keys that were ever usable, with fractional
    // cents, spread over the days; generated in the database in one statement.
    await tx`
      insert into proxy_calls (
        tenant_id, api_key_id, created_at, cost_cents, endpoint, model,
        prompt_tokens, completion_tokens, status_code, latency_ms
      )
      select
        k.tenant_id,
        k.id,
        now() - (n * 37 % 43200) * interval '1 minute',
        round((0.0125 + (n % 97) * 0.0831)::numeric, 6),
        '/v1/chat/completions',
        (array['small-1', 'large-2'])[1 + n % 2],
        100 + n % 900,
        20 + n % 400,
        case when n % 50 = 0 then 429 else 200 end,
        80 + n % 700
      from api_keys as k
      cross join generate_series(1, 400) as n
      where k.status <> 'expired'
    `;
    await tx`
      update api_keys as k
      set total_requests = c.calls, last_used_at = c.last_call
      from (
        select tenant_id, api_key_id, count(*) as calls, max(created_at) as last_call
        from proxy_calls
        group by tenant_id, api_key_id
      ) as c
      where k.tenant_id = c.tenant_id
        and k.id = c.api_key_id
    `;
    return true;
  });
}

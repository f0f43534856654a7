import type { Sql } from "./client.js";
import { type Micros, timestampAt } from "./time.js";

/** A key's calls over a window, as the database summed them. */
export interface UsageRow {
  readonly since_us: Micros;
  readonly until_us: Micros;
  readonly request_count: bigint;
  /** The exact sum of cost_cents as PostgreSQL's numeric text, e.g. "12.5". */
  readonly spend_cents_exact: string;
  /** The exact sum rounded half-up to whole cents. */
  readonly spend_cents: bigint;
}

/**
 * Sums one key's proxy_calls in [sinceUs, untilUs) (untilUs unset: the
 * database's now()). Undefined when the tenant has no such key, so a key of
 * another tenant reads exactly like a missing one.
 */
export async function sumUsageSince(
  sql: Sql,
  tenantId: string,
  keyId: string,
  window: { readonly sinceUs: Micros; readonly untilUs?: Micros },
): Promise<UsageRow | undefined> {
  const until = window.untilUs === undefined ? sql`now()` : timestampAt(sql, window.untilUs);
  // cost_cents is never negative, so round() (half away from zero) is
  // half-up; trim_scale drops numeric(20,6)'s trailing zeros.
  const [row]: [UsageRow?] = await sql`
    with bounds as (
      select ${timestampAt(sql, window.sinceUs)} as since, ${until} as until
    )
    select
      (extract(epoch from bounds.since) * 1000000)::int8 as since_us,
      (extract(epoch from bounds.until) * 1000000)::int8 as until_us,
      calls.request_count,
      trim_scale(calls.spend)::text as spend_cents_exact,
      round(calls.spend)::int8 as spend_cents
    from api_keys
    cross join bounds
    cross join lateral (
      select count(*) as request_count, coalesce(sum(cost_cents), 0) as spend
      from proxy_calls
      where proxy_calls.tenant_id = ${tenantId}
        and proxy_calls.api_key_id = api_keys.id
        and proxy_calls.created_at >= bounds.since
        and proxy_calls.created_at < bounds.until
    ) as calls
    where api_keys.tenant_id = ${tenantId}
      and api_keys.id = ${keyId}
  `;
  return row;
}

import type { Micros } from "../micros.js";
import type { Sql } from "./client.js";
import { timestampAt } from "./time.js";

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
 *
 * The whole UTC days inside the window that the rollup holds come from
 * proxy_call_daily (a row per day and model) and proxy_call_late (calls
 * written for those days since they were rolled up); the rest of the
 * window, at most a partial day at each edge plus the days not rolled up
 * yet, from proxy_calls by index-only scans. One statement, one snapshot: the rollup job and the
 * late-row trigger commit atomically, so the parts never overlap or miss.
 */
export async function fetchKeyUsage(
  sql: Sql,
  tenantId: string,
  keyId: string,
  window: { readonly sinceUs: Micros; readonly untilUs?: Micros },
): Promise<UsageRow | undefined> {
  const until = window.untilUs === undefined ? sql`now()` : timestampAt(sql, window.untilUs);
  // cost_cents is never negative, so round() (half away from zero) is
  // half-up; trim_scale drops the numeric's trailing zeros.
  // The window's bounds and plan are materialized: computed once, and out of
  // the join the planner orders. Each call is planned anew (its window
  // decides the plan), and with them flattened into it the planning took
  // longer than the sums (docs/DESIGN.md).
  const [row]: [UsageRow?] = await sql`
    with bounds as materialized (
      select
        w.since,
        w.until,
        greater.first_whole_day,
        -- least() skips nulls: before the job's first run there is no rollup.
        case when state.rolled_until is not null then
          least(date_trunc('day', w.until, 'UTC'), state.rolled_until::timestamp at time zone 'UTC')
        end as rolled_end
      from (select ${timestampAt(sql, window.sinceUs)} as since, ${until} as until) as w
      cross join usage_rollup_state as state
      cross join lateral (
        select greatest(
          case when date_trunc('day', w.since, 'UTC') = w.since then w.since
               else date_trunc('day', w.since, 'UTC') + interval '1 day' end,
          state.rolled_from::timestamp at time zone 'UTC'
        ) as first_whole_day
      ) as greater
      where state.singleton
    ),
    plan as materialized (
      -- rolled: [first_whole_day, rolled_end) from the rollup, when not empty;
      -- raw: [since, raw_head_end) and [raw_tail_start, until).
      select
        since,
        until,
        coalesce(first_whole_day < rolled_end, false) as use_rollup,
        case when first_whole_day < rolled_end then first_whole_day else until end as raw_head_end,
        case when first_whole_day < rolled_end then rolled_end else until end as raw_tail_start,
        first_whole_day,
        rolled_end
      from bounds
    )
    select
      epoch_micros(plan.since) as since_us,
      epoch_micros(plan.until) as until_us,
      head.request_count + tail.request_count + rolled.request_count + late.request_count as request_count,
      trim_scale(head.spend + tail.spend + rolled.spend + late.spend)::text as spend_cents_exact,
      -- The int64 maximum past it (the exact text beside is the figure).
      least(round(head.spend + tail.spend + rolled.spend + late.spend), 9223372036854775807)::int8 as spend_cents
    from api_keys
    cross join plan
    -- The two raw ranges are two subqueries on purpose: as one join over a
    -- VALUES list of ranges, the planner stopped bounding the index scan by
    -- time and read a hot key's every call (docs/DESIGN.md).
    cross join lateral (
      select count(*) as request_count, coalesce(sum(cost_cents), 0) as spend
      from proxy_calls
      where proxy_calls.tenant_id = ${tenantId}
        and proxy_calls.api_key_id = api_keys.id
        and proxy_calls.created_at >= plan.since
        and proxy_calls.created_at < plan.raw_head_end
    ) as head
    cross join lateral (
      select count(*) as request_count, coalesce(sum(cost_cents), 0) as spend
      from proxy_calls
      where proxy_calls.tenant_id = ${tenantId}
        and proxy_calls.api_key_id = api_keys.id
        and proxy_calls.created_at >= plan.raw_tail_start
        and proxy_calls.created_at < plan.until
    ) as tail
    cross join lateral (
      select coalesce(sum(request_count), 0)::int8 as request_count, coalesce(sum(spend_cents), 0) as spend
      from proxy_call_daily
      where proxy_call_daily.tenant_id = ${tenantId}
        and proxy_call_daily.api_key_id = api_keys.id
        and plan.use_rollup
        and proxy_call_daily.day >= (plan.first_whole_day at time zone 'UTC')::date
        and proxy_call_daily.day < (plan.rolled_end at time zone 'UTC')::date
    ) as rolled
    -- Calls written for those days since they were rolled up (migration 0005).
    cross join lateral (
      select coalesce(sum(request_count), 0)::int8 as request_count, coalesce(sum(spend_cents), 0) as spend
      from proxy_call_late
      where proxy_call_late.tenant_id = ${tenantId}
        and proxy_call_late.api_key_id = api_keys.id
        and plan.use_rollup
        and proxy_call_late.hour >= plan.first_whole_day
        and proxy_call_late.hour < plan.rolled_end
    ) as late
    where api_keys.tenant_id = ${tenantId}
      and api_keys.id = ${keyId}
  `;
  return row;
}

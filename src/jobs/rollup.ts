import type { Sql } from "../db/client.js";

/** Lets one rollup job run at a time across every replica; an arbitrary constant. */
const rollupLockKey = 7_301_944_513n;
/** The first key of a UTC day's advisory lock (migration 0005). */
const dayLockKey = 7_301_944;
/** How often, and how far apart, the job tries again a day whose writers are under way. */
const maxContended = 50;
const contendedRetryMs = 20;

/** Closed UTC days not rolled up yet (0 when up to date); undefined before the first run. */
export async function rollupLagDays(sql: Sql): Promise<number | undefined> {
  const [row]: [{ lag: number | null }?] = await sql`
    select ((now() at time zone 'UTC')::date - rolled_until) as lag
    from usage_rollup_state
    where singleton
  `;
  return row?.lag ?? undefined;
}

/** What one rollUpClosedDays call did. */
export interface RollupRun {
  /** False when another process held the job's lock (nothing was done). */
  readonly ran: boolean;
  /** UTC days rolled up, oldest first, as YYYY-MM-DD. */
  readonly days: string[];
}

/**
 * Rolls up closed UTC days (every day before today) into proxy_call_daily
 * and proxy_call_hourly, by key and model, one day per transaction: the
 * day's sums and the move of rolled_until commit together, so a crash loses at most the day in progress, and the
 * next run resumes there. Runs again are no-ops. With several replicas, only
 * the one that gets the advisory lock works; the rest return at once.
 *
 * The job's statements span tenants by nature (it rolls up a day of every
 * key), unlike every statement on the request path.
 */
export async function rollUpClosedDays(sql: Sql, options: { readonly maxDays?: number } = {}): Promise<RollupRun> {
  const maxDays = options.maxDays ?? 1000;
  const days: string[] = [];
  let contended = 0;
  while (days.length < maxDays) {
    const step = await sql.begin(async (tx) => {
      const [lock]: [{ locked: boolean }?] = await tx`
        select pg_try_advisory_xact_lock(${rollupLockKey.toString()}::int8) as locked
      `;
      if (!lock?.locked) return "busy" as const;
      const [state]: [{ rolled_from: string | null; rolled_until: string | null; today: string }?] = await tx`
        select rolled_from::text, rolled_until::text, (now() at time zone 'UTC')::date::text as today
        from usage_rollup_state
        where singleton
        for update
      `;
      if (!state) throw new Error("usage_rollup_state has no row: run the migrations");
      if (state.rolled_until === null) {
        // First run: start at the oldest call's day (a one-time full scan);
        // older days than that have no calls to roll up.
        await tx`
          update usage_rollup_state
          set rolled_from = first.day,
              rolled_until = first.day
          from (
            select coalesce((min(created_at) at time zone 'UTC')::date, ${state.today}::date) as day
            from proxy_calls
          ) as first
          where singleton
        `;
        return "started" as const;
      }
      const day = state.rolled_until;
      if (day >= state.today) return "done" as const;
      // Holds back the writers of this day (late calls) until it is rolled
      // up, and finds none under way. Only tried: the job waits for no
      // writer, so none can deadlock with it (migration 0005).
      const [free]: [{ free: boolean }?] = await tx`
        select
          pg_try_advisory_xact_lock(${dayLockKey}, usage_all_days_lock_key())
          and pg_try_advisory_xact_lock(${dayLockKey}, usage_day_lock_key(${day}::date)) as free
      `;
      if (!free?.free) return "contended" as const;
      // A day of every key sorts and groups in memory rather than on disk.
      await tx`set local work_mem = '64MB'`;
      await tx`
        with hourly as (
          insert into proxy_call_hourly (tenant_id, api_key_id, hour, model, request_count, spend_cents)
          select tenant_id, api_key_id, date_trunc('hour', created_at, 'UTC'), coalesce(model, ''), count(*), sum(cost_cents)
          from proxy_calls
          where created_at >= ${day}::timestamp at time zone 'UTC'
            and created_at < (${day}::date + 1)::timestamp at time zone 'UTC'
          group by 1, 2, 3, 4
          on conflict (tenant_id, api_key_id, hour, model) do update
            set request_count = excluded.request_count,
                spend_cents = excluded.spend_cents
          returning tenant_id, api_key_id, model, request_count, spend_cents
        ),
        daily as (
          insert into proxy_call_daily (tenant_id, api_key_id, day, model, request_count, spend_cents)
          select tenant_id, api_key_id, ${day}::date, model, sum(request_count), sum(spend_cents)
          from hourly
          group by 1, 2, 3, 4
          on conflict (tenant_id, api_key_id, day, model) do update
            set request_count = excluded.request_count,
                spend_cents = excluded.spend_cents
        )
        -- The day adds to each span that holds it (the spans also hold the
        -- other days rolled up before).
        insert into proxy_call_spans as s (tenant_id, span_days, first_day, api_key_id, request_count, spend_cents)
        select tenant_id, span.days, usage_span_start(${day}::date, span.days), api_key_id, sum(request_count), sum(spend_cents)
        from hourly
        cross join (values (1), (2), (4), (8), (16), (32)) as span (days)
        group by 1, 2, 3, 4
        on conflict (tenant_id, span_days, first_day, api_key_id) do update
          set request_count = s.request_count + excluded.request_count,
              spend_cents = s.spend_cents + excluded.spend_cents
      `;
      await tx`
        update usage_rollup_state
        set rolled_until = ${day}::date + 1
        where singleton
      `;
      return day;
    });
    if (step === "busy") return { ran: days.length > 0, days };
    if (step === "done") break;
    if (step === "contended") {
      // A writer of the day is under way: its transaction is short, try
      // again soon; a day that stays contended waits for the next run.
      if (++contended > maxContended) return { ran: true, days };
      await new Promise((resolve) => setTimeout(resolve, contendedRetryMs));
      continue;
    }
    contended = 0;
    if (step !== "started") days.push(step);
  }
  return { ran: true, days };
}

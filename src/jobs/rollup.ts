import type { Sql, SqlOrTransaction } from "../db/client.js";

/** Lets one rollup job run at a time across every replica; an arbitrary constant. */
const rollupLockKey = 7_301_944_513n;
/** The first key of a UTC day's advisory lock (migration 0005). */
const dayLockKey = 7_301_944;
/** How often, and how far apart, the job tries again a day whose writers are under way. */
const maxContended = 50;
const contendedRetryMs = 20;
/** How far back the first run starts at most: two years of days. */
const maxHistoryDays = 731;
/**
 * How long one of the job's statements may run: a day of a large log, or a
 * fold of the late rows a retention delete leaves, takes longer than the
 * rpcs' limit (DATABASE_STATEMENT_TIMEOUT_MS), which would fail it on every
 * run; one that is stuck is still cut.
 */
const jobStatementTimeout = "15min";
/** Late rows moved per transaction by foldLateCalls. */
const foldBatchRows = 10_000;

/**
 * Takes the job's lock for the rest of the transaction when no other process
 * holds it, and gives the transaction the job's statement limit.
 */
async function tryJobLock(tx: SqlOrTransaction): Promise<boolean> {
  const [lock]: [{ locked: boolean }?] = await tx`
    select
      pg_try_advisory_xact_lock(${rollupLockKey.toString()}::int8) as locked,
      set_config('statement_timeout', ${jobStatementTimeout}, true)
  `;
  return lock?.locked === true;
}

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
 * Rolls up closed UTC days (every day before today) into the rollups
 * (migrations 0005 and 0006), one day per transaction: the day's sums and the move of
 * rolled_until commit together, so a crash loses at most the day in
 * progress, and the next run resumes there. Then folds the calls written
 * since for rolled-up days (proxy_call_late) into them. Runs again are
 * no-ops. With several replicas, only the one that gets the advisory lock
 * works; the rest return at once.
 *
 * The job's statements span tenants by nature (it rolls up a day of every
 * key), unlike every statement on the request path.
 */
export async function rollUpClosedDays(sql: Sql, options: { readonly maxDays?: number } = {}): Promise<RollupRun> {
  const maxDays = options.maxDays ?? 1000;
  const days: string[] = [];
  let contended = 0;
  while (days.length < maxDays) {
    // READ COMMITTED whatever the database's default: the day's sum must see
    // every call committed before the job took the day's lock.
    const step = await sql.begin("isolation level read committed", async (tx) => {
      if (!(await tryJobLock(tx))) return "busy" as const;
      const [state]: [{ rolled_from: string | null; rolled_until: string | null; today: string }?] = await tx`
        select rolled_from::text, rolled_until::text, (now() at time zone 'UTC')::date::text as today
        from usage_rollup_state
        where singleton
        for update skip locked
      `;
      // Skipped: a writer at REPEATABLE READ holds the row while it runs
      // (migration 0005). The job does not queue behind such writers; it
      // comes back.
      if (!state) {
        const [exists]: [{ n: number }?] = await tx`select count(*)::int4 as n from usage_rollup_state`;
        if (exists?.n === 0) throw new Error("usage_rollup_state has no row: run the migrations");
        return "contended" as const;
      }
      if (state.rolled_until === null) {
        // First run: start at the oldest call's day (a one-time full scan);
        // older days than that have no calls to roll up. Not before
        // maxHistoryDays ago (a call at year 1, say, from someone's zero
        // timestamp: older calls are read as they are), and not after today.
        await tx`
          update usage_rollup_state
          set rolled_from = first.day,
              rolled_until = first.day
          from (
            select least(
              greatest(
                (min(created_at) at time zone 'UTC')::date,
                ${state.today}::date - ${maxHistoryDays}::int4
              ),
              ${state.today}::date
            ) as day
            from proxy_calls
            where isfinite(created_at)
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
          insert into proxy_call_hourly (tenant_id, api_key_id, hour, model_key, model, request_count, spend_cents)
          select tenant_id, api_key_id, date_trunc('hour', created_at, 'UTC'), usage_model_key(model),
                 min(coalesce(model, '')), count(*), sum(cost_cents)
          from proxy_calls
          where created_at >= ${day}::timestamp at time zone 'UTC'
            and created_at < (${day}::date + 1)::timestamp at time zone 'UTC'
          group by 1, 2, 3, 4
          returning tenant_id, api_key_id, model_key, model, request_count, spend_cents
        ),
        daily as (
          insert into proxy_call_daily (tenant_id, api_key_id, day, model_key, model, request_count, spend_cents)
          select tenant_id, api_key_id, ${day}::date, model_key, min(model), sum(request_count), sum(spend_cents)
          from hourly
          group by 1, 2, 3, 4
        ),
        by_day as (
          select tenant_id, api_key_id, ${day}::date as day, request_count, spend_cents
          from hourly
        ),
        -- The day's running totals: the day before's in the same block,
        -- carried forward (a row for every key seen in the block), plus the day.
        running as (
          insert into proxy_call_running (day, tenant_id, api_key_id, request_count, spend_micros, spend_cents)
          select ${day}::date, tenant_id, api_key_id, sum(request_count), usage_spend_micros(sum(spend)), usage_spend_overflow(sum(spend))
          from (
            select tenant_id, api_key_id, request_count, usage_running_spend(spend_micros, spend_cents) as spend
            from proxy_call_running
            where day = ${day}::date - 1
              and usage_span_start(${day}::date, 32) < ${day}::date
            union all
            select tenant_id, api_key_id, request_count, spend_cents
            from by_day
          ) as carried
          group by 2, 3
        )
        ${addToSpans(tx, "by_day")}
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
      if (++contended > maxContended) break;
      await new Promise((resolve) => setTimeout(resolve, contendedRetryMs));
      continue;
    }
    contended = 0;
    if (step !== "started") days.push(step);
  }
  if (days.length > 0) await markVisible(sql);
  await foldLateCalls(sql);
  return { ran: true, days };
}

/**
 * VACUUMs the rollups. The days just written are read by every report that
 * ends after them: marked all-visible now, they are read by index-only scans
 * without waiting for autovacuum (with 54,000 heap fetches from rows not yet
 * marked, the 20,000-key tenant's month took 290 ms instead of 40). Only
 * that: a VACUUM that fails (its time limit on a large catch-up) is left to
 * autovacuum, and the days stay rolled up.
 */
async function markVisible(sql: Sql): Promise<void> {
  const connection = await sql.reserve();
  try {
    await connection`select set_config('statement_timeout', ${jobStatementTimeout}, false)`;
    await connection`vacuum proxy_call_hourly, proxy_call_daily, proxy_call_spans, proxy_call_running`;
  } catch {
    // Autovacuum marks them later.
  } finally {
    await connection`reset statement_timeout`.catch(() => {});
    connection.release();
  }
}

/**
 * The end of a statement that adds `rows` (a CTE of tenant_id, api_key_id,
 * day, request_count, spend_cents) to the one-day spans of their days.
 */
function addToSpans(sql: SqlOrTransaction, rows: string) {
  return sql`
    insert into proxy_call_spans as s (tenant_id, first_day, api_key_id, request_count, spend_cents)
    select tenant_id, day, api_key_id, sum(request_count), sum(spend_cents)
    from ${sql(rows)}
    group by 1, 2, 3
    on conflict (tenant_id, first_day, api_key_id) do update
      set request_count = s.request_count + excluded.request_count,
          spend_cents = s.spend_cents + excluded.spend_cents
  `;
}

/**
 * Moves the calls written for rolled-up days since they were rolled up
 * (proxy_call_late, appended to by writers) into the rollups, up to
 * foldBatchRows late rows per transaction: a reader sees each one in one
 * place or the other. (A retention delete of a day leaves a late row per
 * key, hour and model of it, and each updates up to 31 running totals.)
 * Writers append meanwhile without waiting; what they commit later waits
 * for the next run. False when another process holds the job's lock.
 */
export async function foldLateCalls(sql: Sql): Promise<boolean> {
  for (;;) {
    const moved = await foldLateBatch(sql);
    if (moved === undefined) return false;
    if (moved < foldBatchRows) return true;
  }
}

/** One transaction of foldLateCalls: how many late rows it moved, or undefined when the job's lock is held elsewhere. */
async function foldLateBatch(sql: Sql): Promise<number | undefined> {
  return await sql.begin("isolation level read committed", async (tx) => {
    if (!(await tryJobLock(tx))) return undefined;
    // A TRUNCATE of proxy_calls empties the rollups: it waits until these
    // rows are in them, or these wait until it has emptied them.
    await tx`lock table proxy_calls in access share mode`;
    const [result]: [{ moved: number }?] = await tx`
      with moved as (
        delete from proxy_call_late
        where ctid = any (array(select ctid from proxy_call_late limit ${foldBatchRows}))
        returning *
      ),
      grouped as (
        select tenant_id, api_key_id, hour, usage_model_key(model) as model_key, min(model) as model,
               sum(request_count)::int8 as request_count, sum(spend_cents) as spend_cents
        from moved
        group by 1, 2, 3, 4
      ),
      hourly as (
        insert into proxy_call_hourly as h (tenant_id, api_key_id, hour, model_key, model, request_count, spend_cents)
        select tenant_id, api_key_id, hour, model_key, model, request_count, spend_cents
        from grouped
        on conflict (tenant_id, api_key_id, hour, model_key) do update
          set request_count = h.request_count + excluded.request_count,
              spend_cents = h.spend_cents + excluded.spend_cents
      ),
      daily as (
        insert into proxy_call_daily as d (tenant_id, api_key_id, day, model_key, model, request_count, spend_cents)
        select tenant_id, api_key_id, (hour at time zone 'UTC')::date, model_key, min(model), sum(request_count), sum(spend_cents)
        from grouped
        group by 1, 2, 3, 4
        on conflict (tenant_id, api_key_id, day, model_key) do update
          set request_count = d.request_count + excluded.request_count,
              spend_cents = d.spend_cents + excluded.spend_cents
      ),
      by_day as (
        select tenant_id, api_key_id, (hour at time zone 'UTC')::date as day, request_count, spend_cents
        from grouped
      ),
      -- A late call counts in the running totals of its day and of every
      -- later rolled-up day of its block.
      running as (
        insert into proxy_call_running as r (day, tenant_id, api_key_id, request_count, spend_micros, spend_cents)
        select by_day.day + n, tenant_id, api_key_id, sum(request_count), usage_spend_micros(sum(spend_cents)),
               usage_spend_overflow(sum(spend_cents))
        from by_day
        cross join usage_rollup_state as state
        cross join lateral generate_series(0, least(usage_span_start(by_day.day, 32) + 31, state.rolled_until - 1) - by_day.day) as n
        where state.singleton
        group by 1, 2, 3
        on conflict (day, tenant_id, api_key_id) do update
          set request_count = r.request_count + excluded.request_count,
              spend_micros = usage_spend_micros(
                usage_running_spend(r.spend_micros, r.spend_cents) + usage_running_spend(excluded.spend_micros, excluded.spend_cents)
              ),
              spend_cents = usage_spend_overflow(
                usage_running_spend(r.spend_micros, r.spend_cents) + usage_running_spend(excluded.spend_micros, excluded.spend_cents)
              )
      ),
      spans as (
        ${addToSpans(tx, "by_day")}
      )
      select count(*)::int4 as moved from moved
    `;
    return result?.moved ?? 0;
  });
}

import type { Micros } from "../micros.js";
import { arrayLiteral, type Sql, type SqlOrTransaction, unprepared, unscopedSql } from "./client.js";
import { timestampAt } from "./time.js";

/** How a report cuts its window: not at all, by UTC hour, or by UTC day. */
export type BucketWidth = "none" | "hour" | "day";

/** Where a report's rows sort: by time (bucket, key, model), or highest spend first. */
export type ReportOrder = "time" | "spend";

/** The last row of a page, as the next page starts after it. */
export interface ReportPosition {
  readonly bucketUs: Micros;
  /** The key, or the nil UUID when the report is not by key. */
  readonly keyId: string;
  /** The model, or "" when the report is not by model. */
  readonly model: string;
  /** The exact spend, for reports ordered by spend. */
  readonly spendExact: string;
}

/** What a report sums. */
export interface ReportQuery {
  /** The keys to report on; undefined, every key of the tenant (keys since deleted too). */
  readonly keyIds?: readonly string[];
  readonly sinceUs: Micros;
  /** Undefined: the database's clock. */
  readonly untilUs?: Micros;
  readonly width: BucketWidth;
  readonly byKey: boolean;
  readonly byModel: boolean;
  readonly order: ReportOrder;
  readonly after?: ReportPosition;
  readonly limit: number;
}

/** How a report ended: its rows over the window as applied, or why there are none. */
export type ReportOutcome =
  | { readonly kind: "unknown_key" }
  | { readonly kind: "since_after_now" }
  | { readonly kind: "done"; readonly untilUs: Micros; readonly rows: ReportRow[] };

/** One row of a report: one bucket of one key and model (as grouped). */
export interface ReportRow {
  readonly bucket_us: Micros;
  /** Null when the report is not by key. */
  readonly key_id: string | null;
  /** Null when the report is not by model; "" for calls that named none. */
  readonly model: string | null;
  readonly request_count: bigint;
  /** The exact sum of cost_cents, e.g. "12.5". */
  readonly spend_cents_exact: string;
  /** The exact sum rounded half-up to whole cents; null when that is beyond int64. */
  readonly spend_cents: bigint | null;
}

const nilUuid = "00000000-0000-0000-0000-000000000000";

/** The closed UTC days the rollups hold: [fromUs, untilUs), midnights in micros. */
interface RolledDays {
  readonly fromUs: Micros;
  readonly untilUs: Micros;
}

/** What a report statement read before its rows, in the same snapshot. */
interface ReportState {
  /** The database's clock. */
  readonly nowUs: Micros;
  /** How many of the keys asked for the tenant has. */
  readonly knownKeys: number;
  /** Null while no day is rolled up. */
  readonly rolled: RolledDays | null;
}

/**
 * The rolled-up days each pool's last report saw. A report is planned on
 * them and checks them in its own statement (readReport): one statement per
 * report, where reading them first would cost a second round trip.
 */
const rolledDaysSeen = new WeakMap<Sql, RolledDays | null>();

const hourUs = 3_600_000_000n;
const dayUs = 24n * hourUs;
const floorTo = (us: Micros, unit: bigint) => us - (((us % unit) + unit) % unit);
const ceilTo = (us: Micros, unit: bigint) => {
  const floor = floorTo(us, unit);
  return floor === us ? us : floor + unit;
};
const later = (a: Micros, b: Micros) => (a > b ? a : b);
const earlier = (a: Micros, b: Micros) => (a < b ? a : b);

/**
 * A part of a report's window, [fromUs, untilUs), and where it is read
 * from; for running totals, the day [fromUs, untilUs) whose totals are
 * added, or taken away.
 */
interface Piece {
  readonly source: "calls" | "hourly" | "daily" | "spans" | "running" | "late";
  readonly fromUs: Micros;
  /** Undefined: the database's clock (a report to now; only for calls). */
  readonly untilUs?: Micros;
  readonly subtract?: boolean;
}

/**
 * Running totals restart every 32 days, on day numbers from 2000-01-01 (day
 * 10,957 of the Unix epoch) that are multiples of 32 (migration 0006).
 */
const blockDays = 32n;
const blockEpochDay = 10_957n;

/**
 * Whole rolled-up days [fromUs, untilUs) as running totals: in each 32-day
 * block the window touches, the total at the window's last day there, less
 * the total at the day before its first day there unless that is the
 * block's first day.
 */
function runningTotalsOf(fromUs: Micros, untilUs: Micros): Piece[] {
  const pieces: Piece[] = [];
  const first = fromUs / dayUs;
  const end = untilUs / dayUs;
  const offset = (((first - blockEpochDay) % blockDays) + blockDays) % blockDays;
  for (let block = first - offset; block < end; block += blockDays) {
    const from = block > first ? block : first;
    const until = block + blockDays < end ? block + blockDays : end;
    pieces.push({ source: "running", fromUs: (until - 1n) * dayUs, untilUs: until * dayUs });
    if (from > block) {
      pieces.push({ source: "running", fromUs: (from - 1n) * dayUs, untilUs: from * dayUs, subtract: true });
    }
  }
  return pieces;
}

/**
 * Cuts [sinceUs, untilUs) into pieces, each read from the cheapest source
 * that holds it exactly: whole rolled-up days from the running totals
 * (proxy_call_running) for one total per key, from the one-day spans for
 * a whole tenant's days per key, or from proxy_call_daily for some keys' or
 * models' days; the other whole rolled-up hours from proxy_call_hourly (every one of them when the report is hourly); the rest
 * (at most part of an hour at each edge, and the days not rolled up yet,
 * such as today) from proxy_calls; and over the rolled-up hours, the calls
 * written for them since they were rolled up (proxy_call_late). Empty
 * pieces are left out.
 */
function reportPieces(
  sinceUs: Micros,
  untilUs: Micros | undefined,
  shape: { readonly width: BucketWidth; readonly byModel: boolean; readonly keyIds?: readonly string[] },
  rolled: RolledDays | null,
): Piece[] {
  const pieces: Piece[] = [];
  const add = (source: Piece["source"], fromUs: Micros, to: Micros | undefined) => {
    if (to === undefined || fromUs < to) pieces.push({ source, fromUs, untilUs: to });
  };
  if (rolled === null) {
    add("calls", sinceUs, untilUs);
    return pieces;
  }
  const hoursFrom = later(ceilTo(sinceUs, hourUs), rolled.fromUs);
  // A report to now ends after every rolled-up day (its statement checks that).
  const hoursUntil = untilUs === undefined ? rolled.untilUs : earlier(floorTo(untilUs, hourUs), rolled.untilUs);
  if (hoursFrom >= hoursUntil) {
    add("calls", sinceUs, untilUs);
    return pieces;
  }
  add("calls", sinceUs, hoursFrom);
  // Calls written for rolled-up days since, not yet in the rollups.
  add("late", hoursFrom, hoursUntil);
  const daysFrom = ceilTo(hoursFrom, dayUs);
  const daysUntil = floorTo(hoursUntil, dayUs);
  if (shape.width !== "hour" && daysFrom < daysUntil) {
    add("hourly", hoursFrom, daysFrom);
    // One total per key and model over the window: running totals. Days
    // per key and model: the daily rollup, laid out by key; days per key
    // for a whole tenant: the one-day spans, laid out by tenant and day.
    if (shape.width === "none" && !shape.byModel) pieces.push(...runningTotalsOf(daysFrom, daysUntil));
    else if (shape.byModel || shape.keyIds !== undefined) add("daily", daysFrom, daysUntil);
    else add("spans", daysFrom, daysUntil);
    add("hourly", daysUntil, hoursUntil);
  } else {
    add("hourly", hoursFrom, hoursUntil);
  }
  add("calls", hoursUntil, untilUs);
  return pieces;
}

/**
 * What a report's statement assumes of the rollups: the days they held when
 * the pool last looked (`rolled`), which the statement checks before it
 * reads any; or, while the pool has not looked yet, nothing (the statement
 * only reads the state).
 */
type Assumption = { readonly rolled: RolledDays | null } | undefined;

/**
 * One statement: the report's state (the clock, the keys the tenant has,
 * the rolled-up days), and when `assumed` holds, a page of the tenant's
 * usage report over [sinceUs, untilUs): calls summed into buckets, by key
 * and by model as asked, empty buckets left out. Exact whatever the mix of
 * sources (reportPieces): the pieces never overlap, and while a day is
 * rolled up its rollup rows and its calls change together (migrations 0005
 * and 0006).
 * Rolled-up days that are not assumed are read from proxy_calls, which is
 * as exact, so the assumption holds while the rolled-up days include the
 * assumed ones; it fails only when the rollups were emptied (a rebuild).
 * `rows` is undefined when the assumption failed, the tenant lacks a key
 * asked for, or the window starts after the clock it ends at.
 */
async function readReport(
  sql: Sql,
  tenantId: string,
  query: ReportQuery,
  assumed: Assumption,
  sums: "int8" | "numeric",
): Promise<{ state: ReportState; rows: ReportRow[] | undefined }> {
  // Counts and spends in millionths of a cent sum as int8, which is faster
  // and fails past int8 (the caller then asks for numeric sums).
  const total = sums === "int8" ? sql`usage_int8_sum` : sql`sum`;
  const keys = query.keyIds === undefined ? sql`` : sql`and api_key_id = any(${arrayLiteral(query.keyIds)}::uuid[])`;
  const since = timestampAt(sql, query.sinceUs);
  const until = query.untilUs === undefined ? sql`now()` : timestampAt(sql, query.untilUs);
  // Without buckets, every row's bucket is the window's start (set below).
  const bucket =
    query.width === "none"
      ? sql`null::timestamptz`
      : query.width === "hour"
        ? sql`date_trunc('hour', at, 'UTC')`
        : sql`date_trunc('day', at, 'UTC')`;
  const keyColumn = query.byKey ? sql`api_key_id` : sql`null::uuid`;
  const modelColumn = query.byModel ? sql`model` : sql`null::text`;
  // A report without buckets needs no instant per row.
  const at = (column: ReturnType<Sql>) => (query.width === "none" ? sql`null::timestamptz` : column);
  // Every piece yields at, api_key_id, model, request_count, spend (numeric
  // cents) and spend_micros (int8 millionths of a cent); one of the last two is null.
  const read = (piece: Piece) => {
    const from = timestampAt(sql, piece.fromUs);
    const to = piece.untilUs === undefined ? sql`now()` : timestampAt(sql, piece.untilUs);
    switch (piece.source) {
      case "calls":
        return sql`
          select ${at(sql`created_at`)} as at, api_key_id, coalesce(model, '') as model, 1::int8 as request_count,
                 cost_cents as spend, null::int8 as spend_micros
          from proxy_calls
          where tenant_id = ${tenantId} ${keys}
            and created_at >= ${from}
            and created_at < ${to}
        `;
      case "hourly":
        return sql`
          select ${at(sql`hour`)} as at, api_key_id, model, request_count, spend_cents as spend, null::int8 as spend_micros
          from proxy_call_hourly
          where tenant_id = ${tenantId} ${keys}
            and hour >= ${from}
            and hour < ${to}
        `;
      case "late":
        return sql`
          select ${at(sql`hour`)} as at, api_key_id, model, request_count, spend_cents as spend, null::int8 as spend_micros
          from proxy_call_late
          where tenant_id = ${tenantId} ${keys}
            and hour >= ${from}
            and hour < ${to}
        `;
      case "spans":
        return sql`
          select ${at(sql`first_day::timestamp at time zone 'UTC'`)} as at, api_key_id, '' as model, request_count,
                 spend_cents as spend, null::int8 as spend_micros
          from proxy_call_spans
          where tenant_id = ${tenantId} ${keys}
            and first_day >= (${from} at time zone 'UTC')::date
            and first_day < (${to} at time zone 'UTC')::date
        `;
      case "daily":
        return sql`
          select ${at(sql`day::timestamp at time zone 'UTC'`)} as at, api_key_id, model, request_count,
                 spend_cents as spend, null::int8 as spend_micros
          from proxy_call_daily
          where tenant_id = ${tenantId} ${keys}
            and day >= (${from} at time zone 'UTC')::date
            and day < (${to} at time zone 'UTC')::date
        `;
      case "running": {
        const sign = piece.subtract ? sql`-` : sql``;
        return sql`
          select null::timestamptz as at, api_key_id, '' as model, ${sign}request_count as request_count,
                 ${sign}spend_cents as spend, ${sign}spend_micros as spend_micros
          from proxy_call_running
          where day = (${from} at time zone 'UTC')::date
            and tenant_id = ${tenantId} ${keys}
        `;
      }
    }
  };
  const pieces = assumed === undefined ? [] : reportPieces(query.sinceUs, query.untilUs, query, assumed.rolled);
  const known =
    query.keyIds === undefined
      ? sql`0`
      : sql`(
          select count(*)::int4
          from api_keys
          where tenant_id = ${tenantId}
            and id = any(${arrayLiteral(query.keyIds)}::uuid[])
        )`;
  // The rolled-up days include the assumed ones, which a report to now ends after.
  const stillRolled = (rolled: RolledDays) => sql`coalesce(
    from_us <= ${rolled.fromUs.toString()}::int8
    and until_us >= ${rolled.untilUs.toString()}::int8
    ${query.untilUs === undefined ? sql`and now_us >= ${rolled.untilUs.toString()}::int8` : sql``},
    false)`;
  // The state a report needs: the keys asked for are the tenant's, the
  // window does not start after it ends, and the assumption holds.
  const holds = sql`
    ${query.keyIds === undefined ? sql`true` : sql`known = ${query.keyIds.length}`}
    and ${since} <= ${until}
    and ${assumed === undefined ? sql`false` : assumed.rolled === null ? sql`true` : stillRolled(assumed.rolled)}
  `;
  const union =
    pieces.length === 0
      ? sql`
          select null::timestamptz as at, null::uuid as api_key_id, null::text as model, 0::int8 as request_count,
                 0::numeric as spend, 0::int8 as spend_micros
          where false
        `
      : pieces.map(read).reduce((all, next) => sql`${all} union all ${next}`);
  const after = query.after;
  // Rows sort by bucket (when there are buckets), key and model, after the
  // spend when asked; a page starts after the last row of the one before.
  const bucketed = query.width !== "none";
  const rowKey = bucketed ? sql`(bucket, sort_key, sort_model)` : sql`(sort_key, sort_model)`;
  const afterKey = (position: ReportPosition) =>
    bucketed
      ? sql`(${timestampAt(sql, position.bucketUs)}, ${position.keyId}::uuid, ${position.model}::text collate "C")`
      : sql`(${position.keyId}::uuid, ${position.model}::text collate "C")`;
  const position =
    after === undefined
      ? sql``
      : query.order === "time"
        ? sql`where ${rowKey} > ${afterKey(after)}`
        : sql`where spend < ${after.spendExact}::numeric
            or (spend = ${after.spendExact}::numeric and ${rowKey} > ${afterKey(after)})`;
  const order = sql`order by ${query.order === "spend" ? sql`spend desc, ` : sql``}${bucketed ? sql`bucket, ` : sql``}sort_key, sort_model`;
  const statement = (db: SqlOrTransaction) =>
    unprepared(db<(ReportRow & StateColumns)[]>`
    with state as materialized (
      select
        *,
        ${holds} as holds
      from (
        select
          epoch_micros(now()) as now_us,
          ${known} as known,
          epoch_micros(rolled_from::timestamp at time zone 'UTC') as from_us,
          epoch_micros(rolled_until::timestamp at time zone 'UTC') as until_us
        from (select) as one
        left join usage_rollup_state on singleton
      ) as read
    ),
    report as (
      select
        ${bucket} as bucket,
        ${keyColumn} as key_id,
        ${modelColumn} as model,
        ${total}(request_count)::int8 as request_count,
        -- The numeric sum only over the rows that have a numeric spend: its
        -- state is made on its first row, null or not.
        coalesce(sum(spend) filter (where spend is not null), 0)
          + coalesce(${total}(spend_micros) * 0.000001, 0) as spend
      from (${union}) as pieces
      where (select holds from state)
      group by 1, 2, 3
      having ${total}(request_count) <> 0
    ),
    sorted as (
      select
        bucket,
        key_id,
        model,
        request_count,
        spend,
        coalesce(key_id, ${nilUuid}::uuid) as sort_key,
        coalesce(model, '') collate "C" as sort_model
      from report
    )
    select
      now_us, known, from_us, until_us, holds,
      null::int8 as bucket_us, null::text as key_id, null::text as model, null::int8 as request_count,
      null::text as spend_cents_exact, null::int8 as spend_cents
    from state
    union all
    (
      select
        null, null, null, null, null,
        ${bucketed ? sql`epoch_micros(bucket)` : sql`${query.sinceUs.toString()}::int8`},
        key_id::text,
        model,
        request_count,
        trim_scale(spend)::text,
        -- Null past int64 (the caller gets the exact text; see reportRow).
        case when abs(round(spend)) <= 9223372036854775807 then round(spend)::int8 end
      -- The page first, then its text: PostgreSQL would otherwise convert
      -- every row of the report before sorting (20,000 for a tenant's keys).
      from (
        select *
        from sorted
        ${position}
        ${order}
        limit ${query.limit}
      ) as page
      ${order}
    )
  `);
  // A whole tenant: without parallel workers, whose partial numeric sums
  // cost more to merge than they saved (docs/DESIGN.md), and with room to
  // group its keys in memory.
  const result =
    query.keyIds !== undefined || pieces.length === 0
      ? await statement(sql)
      : await sql.begin(async (tx) => {
          await tx`set local max_parallel_workers_per_gather = 0`;
          await tx`set local work_mem = '32MB'`;
          return await statement(tx);
        });
  // The state row is the one with `holds` set; the report's rows have it null.
  const head = result.find((row) => row.holds !== null);
  if (head?.holds == null || head.now_us == null) throw new Error("a usage report's statement returned no state row");
  const rows: ReportRow[] = [];
  for (const { now_us, known, from_us, until_us, holds, ...row } of result) if (holds === null) rows.push(row);
  const state: ReportState = {
    nowUs: head.now_us,
    knownKeys: head.known ?? 0,
    rolled: head.from_us != null && head.until_us != null ? { fromUs: head.from_us, untilUs: head.until_us } : null,
  };
  return { state, rows: head.holds ? rows : undefined };
}

/** SQLSTATE numeric_value_out_of_range: here, an int8 sum past int8. */
const numericOutOfRange = "22003";

/** The state columns of a report statement's first row (null on the others). */
interface StateColumns {
  readonly now_us: Micros | null;
  readonly known: number | null;
  readonly from_us: Micros | null;
  readonly until_us: Micros | null;
  readonly holds: boolean | null;
}

/** readReport with int8 sums, or with numeric ones when an int8 sum would pass int8. */
async function readReportSummed(sql: Sql, tenantId: string, query: ReportQuery, assumed: Assumption) {
  try {
    return await readReport(sql, tenantId, query, assumed, "int8");
  } catch (err) {
    if ((err as { code?: unknown }).code !== numericOutOfRange) throw err;
    return await readReport(sql, tenantId, query, assumed, "numeric");
  }
}

/**
 * A page of a tenant's usage report (readReport), after checking that the
 * tenant has every key asked for and that the window does not start after
 * the database's clock when it ends there. Usually one statement, planned
 * on the rolled-up days the pool saw last; when those no longer hold (or on
 * the pool's first report), run again on the days as they are, with the
 * window's end fixed at the first statement's clock, and at the third try
 * on proxy_calls alone, which no rollup state can make wrong.
 */
export async function fetchUsageReport(sql: Sql, tenantId: string, query: ReportQuery): Promise<ReportOutcome> {
  const pool = unscopedSql(sql);
  const seen = rolledDaysSeen.get(pool);
  let assumed: Assumption = seen === undefined ? undefined : { rolled: seen };
  let untilUs = query.untilUs;
  for (let attempt = 1; ; attempt++) {
    const { state, rows } = await readReportSummed(sql, tenantId, { ...query, untilUs }, assumed);
    rolledDaysSeen.set(pool, state.rolled);
    if (query.keyIds !== undefined && state.knownKeys < query.keyIds.length) return { kind: "unknown_key" };
    untilUs ??= state.nowUs;
    if (query.sinceUs > untilUs) return { kind: "since_after_now" };
    if (rows !== undefined) return { kind: "done", untilUs, rows };
    assumed = { rolled: attempt === 1 ? state.rolled : null };
  }
}

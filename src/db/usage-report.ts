import type { Micros } from "../micros.js";
import { arrayLiteral, type Sql, type SqlOrTransaction, unprepared } from "./client.js";
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

/** What a report needs to know before it runs. */
interface ReportPreflight {
  /** The database's clock. */
  readonly nowUs: Micros;
  /** How many of the keys asked for the tenant has. */
  readonly knownKeys: number;
  /** Undefined before the rollup job's first run. */
  readonly rolled: RolledDays | undefined;
}

/**
 * The database's clock, how many of `keyIds` the tenant has, and which days
 * the rollups hold. Read apart from the report itself, which is still exact:
 * the rolled-up days only grow, and while a day is rolled up, its rollup
 * rows and its calls change together (migration 0005), so a report that
 * reads a day from proxy_calls that has since been rolled up reads it right.
 */
async function reportPreflight(
  sql: Sql,
  tenantId: string,
  keyIds: readonly string[] | undefined,
): Promise<ReportPreflight> {
  const known =
    keyIds === undefined
      ? sql`0`
      : sql`(
          select count(*)::int4
          from api_keys
          where tenant_id = ${tenantId}
            and id = any(${arrayLiteral(keyIds)}::uuid[])
        )`;
  const [row]: [{ now_us: Micros; known: number; from_us: Micros | null; until_us: Micros | null }?] = await sql`
    select
      epoch_micros(now()) as now_us,
      ${known} as known,
      epoch_micros(rolled_from::timestamp at time zone 'UTC') as from_us,
      epoch_micros(rolled_until::timestamp at time zone 'UTC') as until_us
    from usage_rollup_state
    where singleton
  `;
  const rolled =
    row?.from_us != null && row.until_us != null ? { fromUs: row.from_us, untilUs: row.until_us } : undefined;
  return { nowUs: row?.now_us ?? 0n, knownKeys: row?.known ?? 0, rolled };
}

const hourUs = 3_600_000_000n;
const dayUs = 24n * hourUs;
const floorTo = (us: Micros, unit: bigint) => us - (((us % unit) + unit) % unit);
const ceilTo = (us: Micros, unit: bigint) => {
  const floor = floorTo(us, unit);
  return floor === us ? us : floor + unit;
};
const later = (a: Micros, b: Micros) => (a > b ? a : b);
const earlier = (a: Micros, b: Micros) => (a < b ? a : b);

/** A part of a report's window, [fromUs, untilUs), and where it is read from. */
interface Piece {
  readonly source: "calls" | "hourly" | "daily" | "spans" | "late";
  readonly fromUs: Micros;
  readonly untilUs: Micros;
  /** For spans: their length in days. */
  readonly spanDays?: number;
}

/** Day numbers count from 2000-01-01, which is day 10,957 of the Unix epoch (migration 0005). */
const spanEpochDay = 10_957n;
const spanLengths = [32n, 16n, 8n, 4n, 2n, 1n];

/**
 * Whole days [fromUs, untilUs) as the fewest aligned spans (a span of n
 * days starts on a day number that is a multiple of n): at most two of each
 * length, largest first in the middle.
 */
function spansOf(fromUs: Micros, untilUs: Micros): Piece[] {
  const spans: Piece[] = [];
  for (let day = fromUs / dayUs; day < untilUs / dayUs; ) {
    const number = day - spanEpochDay;
    const length = spanLengths.find((n) => ((number % n) + n) % n === 0n && day + n <= untilUs / dayUs) ?? 1n;
    spans.push({ source: "spans", spanDays: Number(length), fromUs: day * dayUs, untilUs: (day + length) * dayUs });
    day += length;
  }
  return spans;
}

/**
 * Cuts [sinceUs, untilUs) into pieces, each read from the cheapest source
 * that holds it exactly: whole rolled-up days from the spans (the fewest
 * aligned ones; one-day spans for daily buckets) for a whole tenant, or
 * from proxy_call_daily for some keys or by model; the other whole rolled-up hours from
 * proxy_call_hourly (every one of them when the report is hourly); the rest
 * (at most part of an hour at each edge, and the days not rolled up yet,
 * such as today) from proxy_calls; and over the rolled-up hours, the calls
 * written for them since they were rolled up (proxy_call_late). Empty
 * pieces are left out.
 */
function reportPieces(
  sinceUs: Micros,
  untilUs: Micros,
  shape: { readonly width: BucketWidth; readonly byModel: boolean; readonly keyIds?: readonly string[] },
  rolled: RolledDays | undefined,
): Piece[] {
  const pieces: Piece[] = [];
  const add = (source: Piece["source"], fromUs: Micros, to: Micros) => {
    if (fromUs < to) pieces.push({ source, fromUs, untilUs: to });
  };
  const hoursFrom = rolled && later(ceilTo(sinceUs, hourUs), rolled.fromUs);
  const hoursUntil = rolled && earlier(floorTo(untilUs, hourUs), rolled.untilUs);
  if (hoursFrom === undefined || hoursUntil === undefined || hoursFrom >= hoursUntil) {
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
    // Spans are laid out by tenant and day (a tenant's keys together), the
    // daily rollup by key: the spans serve a whole tenant, not some keys.
    if (shape.byModel || shape.keyIds !== undefined) add("daily", daysFrom, daysUntil);
    else if (shape.width === "day") pieces.push({ source: "spans", spanDays: 1, fromUs: daysFrom, untilUs: daysUntil });
    else pieces.push(...spansOf(daysFrom, daysUntil));
    add("hourly", daysUntil, hoursUntil);
  } else {
    add("hourly", hoursFrom, hoursUntil);
  }
  add("calls", hoursUntil, untilUs);
  return pieces;
}

/**
 * A page of a tenant's usage report over [sinceUs, untilUs): calls summed
 * into buckets, by key and by model as asked, empty buckets left out. Exact
 * whatever the mix of sources (reportPieces): the pieces never overlap, and
 * the rollups hold exactly the calls of the days in `rolled`.
 */
async function readReport(
  sql: Sql,
  tenantId: string,
  query: ReportQuery & { readonly untilUs: Micros; readonly rolled: RolledDays | undefined },
): Promise<ReportRow[]> {
  const keys = query.keyIds === undefined ? sql`` : sql`and api_key_id = any(${arrayLiteral(query.keyIds)}::uuid[])`;
  const since = timestampAt(sql, query.sinceUs);
  const bucket =
    query.width === "none"
      ? since
      : query.width === "hour"
        ? sql`date_trunc('hour', at, 'UTC')`
        : sql`date_trunc('day', at, 'UTC')`;
  const keyColumn = query.byKey ? sql`api_key_id` : sql`null::uuid`;
  const modelColumn = query.byModel ? sql`model` : sql`null::text`;
  const read = (piece: Piece) => {
    const from = timestampAt(sql, piece.fromUs);
    const to = timestampAt(sql, piece.untilUs);
    switch (piece.source) {
      case "calls":
        return sql`
          select created_at as at, api_key_id, coalesce(model, '') as model, 1::int8 as request_count, cost_cents as spend
          from proxy_calls
          where tenant_id = ${tenantId} ${keys}
            and created_at >= ${from}
            and created_at < ${to}
        `;
      case "hourly":
        return sql`
          select hour as at, api_key_id, model, request_count, spend_cents as spend
          from proxy_call_hourly
          where tenant_id = ${tenantId} ${keys}
            and hour >= ${from}
            and hour < ${to}
        `;
      case "late":
        return sql`
          select hour as at, api_key_id, model, request_count, spend_cents as spend
          from proxy_call_late
          where tenant_id = ${tenantId} ${keys}
            and hour >= ${from}
            and hour < ${to}
        `;
      case "spans":
        return sql`
          select first_day::timestamp at time zone 'UTC' as at, api_key_id, '' as model, request_count, spend_cents as spend
          from proxy_call_spans
          where tenant_id = ${tenantId} ${keys}
            and span_days = ${piece.spanDays ?? 1}
            and first_day >= (${from} at time zone 'UTC')::date
            and first_day < (${to} at time zone 'UTC')::date
        `;
      case "daily":
        return sql`
          select day::timestamp at time zone 'UTC' as at, api_key_id, model, request_count, spend_cents as spend
          from proxy_call_daily
          where tenant_id = ${tenantId} ${keys}
            and day >= (${from} at time zone 'UTC')::date
            and day < (${to} at time zone 'UTC')::date
        `;
    }
  };
  const pieces = reportPieces(query.sinceUs, query.untilUs, query, query.rolled);
  if (pieces.length === 0) return [];
  const union = pieces.map(read).reduce((all, next) => sql`${all} union all ${next}`);
  const after = query.after;
  const position =
    after === undefined
      ? sql``
      : query.order === "time"
        ? sql`where (bucket, sort_key, sort_model) > (${timestampAt(sql, after.bucketUs)}, ${after.keyId}::uuid, ${after.model}::text collate "C")`
        : sql`where spend < ${after.spendExact}::numeric
            or (spend = ${after.spendExact}::numeric
                and (bucket, sort_key, sort_model) > (${timestampAt(sql, after.bucketUs)}, ${after.keyId}::uuid, ${after.model}::text collate "C"))`;
  const order =
    query.order === "time"
      ? sql`order by bucket, sort_key, sort_model`
      : sql`order by spend desc, bucket, sort_key, sort_model`;
  const statement = (db: SqlOrTransaction) =>
    unprepared(db<ReportRow[]>`
    with report as (
      select
        ${bucket} as bucket,
        ${keyColumn} as key_id,
        ${modelColumn} as model,
        sum(request_count)::int8 as request_count,
        sum(spend) as spend
      from (${union}) as pieces
      group by 1, 2, 3
      having sum(request_count) <> 0
    ),
    sorted as (
      select
        *,
        coalesce(key_id, ${nilUuid}::uuid) as sort_key,
        coalesce(model, '') collate "C" as sort_model
      from report
    )
    select
      epoch_micros(bucket) as bucket_us,
      key_id::text,
      model,
      request_count,
      trim_scale(spend)::text as spend_cents_exact,
      -- Null past int64 (the caller gets the exact text; see reportRow).
      case when abs(round(spend)) <= 9223372036854775807 then round(spend)::int8 end as spend_cents
    from sorted
    ${position}
    ${order}
    limit ${query.limit}
  `);
  if (query.keyIds !== undefined) return await statement(sql);
  // A whole tenant: without parallel workers, whose partial numeric sums
  // cost more to merge than they saved (docs/DESIGN.md), and with room to
  // group its keys in memory.
  return await sql.begin(async (tx) => {
    await tx`set local max_parallel_workers_per_gather = 0`;
    await tx`set local work_mem = '32MB'`;
    return await statement(tx);
  });
}

/**
 * A page of a tenant's usage report (readReport), after checking that the
 * tenant has every key asked for and that the window does not start after
 * the database's clock when it ends there.
 */
export async function fetchUsageReport(sql: Sql, tenantId: string, query: ReportQuery): Promise<ReportOutcome> {
  const { nowUs, knownKeys, rolled } = await reportPreflight(sql, tenantId, query.keyIds);
  if (query.keyIds !== undefined && knownKeys < query.keyIds.length) return { kind: "unknown_key" };
  const untilUs = query.untilUs ?? nowUs;
  if (query.sinceUs > untilUs) return { kind: "since_after_now" };
  return { kind: "done", untilUs, rows: await readReport(sql, tenantId, { ...query, untilUs, rolled }) };
}

import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { JsonObject } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { expect } from "chai";
import { arrayLiteral, createSql, type Sql } from "../src/db/client.js";
import { fetchKeyUsage } from "../src/db/usage.js";
import type { BucketWidth, ReportOrder, ReportRow } from "../src/db/usage-report.js";
import { fetchUsageReport, type ReportQuery } from "../src/db/usage-report.js";
import { rollUpClosedDays } from "../src/jobs/rollup.js";
import { connectGrpcCaller, failure, grpcJsCaller, type JsonCaller } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { generator, insertKey, newTenant } from "./support/fixtures.js";
import { useTestService } from "./support/service.js";

const hourUs = 3_600_000_000n;
const dayUs = 24n * hourUs;
const widths: BucketWidth[] = ["none", "hour", "day"];
const nilUuid = "00000000-0000-0000-0000-000000000000";

interface Shape {
  keyIds?: string[];
  sinceUs: bigint;
  untilUs: bigint;
  width: BucketWidth;
  byKey: boolean;
  byModel: boolean;
  order: ReportOrder;
}

/** The rows of fetchUsageReport. */
async function report(sql: Sql, tenantId: string, query: ReportQuery): Promise<ReportRow[]> {
  const outcome = await fetchUsageReport(sql, tenantId, query);
  if (outcome.kind !== "done") throw new Error(`report: ${outcome.kind}`);
  return outcome.rows;
}

/** The report a plain GROUP BY over proxy_calls gives, in the report's order. */
async function groupByReport(sql: Sql, tenantId: string, s: Shape): Promise<ReportRow[]> {
  const at = (us: bigint) => sql`(to_timestamp(0) + ${us.toString()}::int8 * interval '1 microsecond')`;
  const bucket =
    s.width === "none"
      ? at(s.sinceUs)
      : s.width === "hour"
        ? sql`date_trunc('hour', created_at, 'UTC')`
        : sql`date_trunc('day', created_at, 'UTC')`;
  const keys = s.keyIds ? sql`and api_key_id = any(${arrayLiteral(s.keyIds)}::uuid[])` : sql``;
  const order =
    s.order === "time"
      ? sql`order by bucket, coalesce(key_id, ${nilUuid}::uuid), coalesce(model, '') collate "C"`
      : sql`order by spend desc, bucket, coalesce(key_id, ${nilUuid}::uuid), coalesce(model, '') collate "C"`;
  return await sql<ReportRow[]>`
    select epoch_micros(bucket) as bucket_us, key_id::text, model, request_count,
           trim_scale(spend)::text as spend_cents_exact, round(spend)::int8 as spend_cents
    from (
      select ${bucket} as bucket,
             ${s.byKey ? sql`api_key_id` : sql`null::uuid`} as key_id,
             ${s.byModel ? sql`coalesce(model, '')` : sql`null::text`} as model,
             count(*) as request_count, sum(cost_cents) as spend
      from proxy_calls
      where tenant_id = ${tenantId} ${keys}
        and created_at >= ${at(s.sinceUs)} and created_at < ${at(s.untilUs)}
      group by 1, 2, 3
    ) as grouped
    ${order}
  `;
}

/** Rows of the rollups that a fresh GROUP BY of proxy_calls over the rolled-up days contradicts. */
async function rollupMismatches(sql: Sql): Promise<number> {
  const [row]: [{ n: bigint }?] = await sql`
    with state as (
      select rolled_from::timestamp at time zone 'UTC' as rf, rolled_until::timestamp at time zone 'UTC' as ru,
             rolled_until as last_day_after
      from usage_rollup_state
    ),
    calls as (select * from proxy_calls, state where created_at >= rf and created_at < ru),
    fresh as (
      select 'h' as kind, tenant_id, api_key_id, date_trunc('hour', created_at, 'UTC') as at, coalesce(model, '') as model,
             count(*) as request_count, sum(cost_cents) as spend_cents
      from calls group by 2, 3, 4, 5
      union all
      select 'd', tenant_id, api_key_id, date_trunc('day', created_at, 'UTC'), coalesce(model, ''),
             count(*), sum(cost_cents)
      from calls group by 2, 3, 4, 5
      union all
      select 's', tenant_id, api_key_id, date_trunc('day', created_at, 'UTC'), '', count(*), sum(cost_cents)
      from calls group by 2, 3, 4
      union all
      -- A running total for every rolled-up day of a call's block from the call's day on.
      select 'r', tenant_id, api_key_id, (day + n)::timestamp at time zone 'UTC', '', count(*), sum(cost_cents)
      from (select *, (created_at at time zone 'UTC')::date as day from calls) as c
      cross join lateral generate_series(0, least(usage_span_start(day, 32) + 31, last_day_after - 1) - day) as n
      group by 2, 3, 4
    ),
    kept as (
      select kind, tenant_id, api_key_id, at, model, sum(request_count) as request_count, sum(spend_cents) as spend_cents
      from (
        select 'h' as kind, tenant_id, api_key_id, hour as at, model, request_count, spend_cents
        from proxy_call_hourly
        union all
        select 'd', tenant_id, api_key_id, day::timestamp at time zone 'UTC', model, request_count, spend_cents
        from proxy_call_daily
        union all
        select 's', tenant_id, api_key_id, first_day::timestamp at time zone 'UTC', '', request_count, spend_cents
        from proxy_call_spans
        union all
        select 'r', tenant_id, api_key_id, day::timestamp at time zone 'UTC', '', request_count,
               usage_running_spend(spend_micros, spend_cents)
        from proxy_call_running
        union all
        -- Calls written since for rolled-up days, not folded in yet.
        select k.kind, tenant_id, api_key_id, k.at, model, request_count, spend_cents
        from proxy_call_late
        cross join lateral (values ('h', hour), ('d', date_trunc('day', hour, 'UTC'))) as k (kind, at)
        union all
        select 's', tenant_id, api_key_id, date_trunc('day', hour, 'UTC'), '', request_count, spend_cents
        from proxy_call_late
        union all
        select 'r', tenant_id, api_key_id, (day + n)::timestamp at time zone 'UTC', '', request_count, spend_cents
        from (select *, (hour at time zone 'UTC')::date as day from proxy_call_late) as l
        cross join usage_rollup_state as state
        cross join lateral generate_series(0, least(usage_span_start(day, 32) + 31, state.rolled_until - 1) - day) as n
      ) as all_rows
      group by 1, 2, 3, 4, 5
      having sum(request_count) <> 0
    )
    select count(*) as n from (
      (select * from fresh except select * from kept)
      union all
      (select * from kept except select * from fresh)
    ) as diff
  `;
  return Number(row?.n);
}

describe("FetchUsageReport's sums", () => {
  let db: TestDatabase;
  let tenantId: string;
  let keys: string[];
  let nowUs: bigint;

  /** Calls spread over the last `days` days, of `keys` and of a key since deleted, with fractional costs. */
  async function insertSpread(count: number, days: number, seed: number) {
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
      select
        ${tenantId},
        (${arrayLiteral(keys)}::uuid[])[1 + (n * 7 + ${seed}) % ${keys.length}],
        now() - ((n::int8 * 2654435761 + ${seed}) % (${days}::int8 * 86400000)) * interval '1 millisecond'
              - (n % 1000) * interval '1 microsecond',
        ((n * 31 + ${seed}) % 100000) / 10000.0,
        (array['small-1', 'large-2', null, 'Ünïcode', 'B'])[1 + (n * 13 + ${seed}) % 5]
      from generate_series(1, ${count}) as n
    `;
  }

  function randomShape(random: () => number, i: number): Shape {
    const a = nowUs - BigInt(Math.floor(random() * 22 * 86_400_000_000));
    const b = nowUs - BigInt(Math.floor(random() * 22 * 86_400_000_000)) + 3_600_000_000n;
    let [sinceUs, untilUs] = a <= b ? [a, b] : [b, a];
    // Some windows on whole hours or whole days, as billing asks.
    if (i % 4 === 1) [sinceUs, untilUs] = [sinceUs - (sinceUs % hourUs), untilUs - (untilUs % hourUs)];
    if (i % 4 === 2) [sinceUs, untilUs] = [sinceUs - (sinceUs % dayUs), untilUs - (untilUs % dayUs)];
    const pick = random();
    const keyIds =
      // Named keys are the tenant's; the deleted key's calls show in reports of every key.
      pick < 0.4 ? undefined : pick < 0.7 ? [keys[Math.floor(random() * 5)] as string] : keys.slice(0, 3);
    return {
      keyIds,
      sinceUs,
      untilUs,
      width: widths[Math.floor(random() * 3)] as BucketWidth,
      byKey: random() < 0.5,
      byModel: random() < 0.5,
      order: random() < 0.7 ? "time" : "spend",
    };
  }

  async function expectReportsExact(seed: number, count: number) {
    const random = generator(seed);
    for (let i = 0; i < count; i++) {
      const shape = randomShape(random, i);
      const got = await report(db.sql, tenantId, { ...shape, limit: 100_000 });
      const want = await groupByReport(db.sql, tenantId, shape);
      expect(
        got,
        `report ${i} of seed ${seed}: ${JSON.stringify(shape, (_k, v) => (typeof v === "bigint" ? String(v) : v))}`,
      ).to.deep.equal(want);
    }
  }

  /** Each key's report without buckets equals FetchKeyUsage, on random windows. */
  async function expectUsageMatches(seed: number, count: number) {
    const random = generator(seed);
    for (let i = 0; i < count; i++) {
      const shape = randomShape(random, i);
      const keyId = keys[i % 5] as string;
      const rows = await report(db.sql, tenantId, {
        ...shape,
        keyIds: [keyId],
        byKey: true,
        byModel: false,
        width: "none",
        limit: 10,
      });
      const usage = await fetchKeyUsage(db.sql, tenantId, keyId, shape);
      expect(rows.length).to.be.at.most(1);
      expect([rows[0]?.request_count ?? 0n, rows[0]?.spend_cents_exact ?? "0"]).to.deep.equal([
        usage?.request_count,
        usage?.spend_cents_exact,
      ]);
    }
  }

  before(async () => {
    db = await createTestDatabase();
    tenantId = newTenant();
    keys = [];
    for (let i = 0; i < 5; i++) keys.push(await insertKey(db.sql, { tenantId }));
    keys.push(randomUUID()); // a key since deleted: its calls stay the tenant's
    await insertSpread(5000, 20, 1);
    // Another tenant's calls on the same days, which no report of this one may count.
    const other = newTenant();
    const otherKey = await insertKey(db.sql, { tenantId: other });
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
      select ${other}, ${otherKey}, now() - n * interval '17 minutes', 1000
      from generate_series(1, 1500) as n
    `;
    const [now]: [{ us: bigint }?] = await db.sql`select epoch_micros(now()) as us`;
    nowUs = now?.us ?? 0n;
  });
  after(async () => {
    await db?.drop();
  });

  it("equal a plain GROUP BY on random windows, widths and groupings before the first rollup", async () => {
    await expectReportsExact(21, 40);
  });

  it("equal it with part of the days rolled up, then all of them", async () => {
    await rollUpClosedDays(db.sql, { maxDays: 8 });
    await expectReportsExact(22, 40);
    await rollUpClosedDays(db.sql);
    expect(await rollupMismatches(db.sql)).to.equal(0);
    await expectReportsExact(23, 60);
  });

  it("equal it after late calls, changed calls and deleted calls on rolled-up days", async () => {
    const key = keys[1] as string;
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
      select ${tenantId}, ${key}, date_trunc('day', now(), 'UTC') - n * interval '1 day' + n * interval '1 hour 1 microsecond',
             n / 1000000.0, 'late'
      from generate_series(1, 12) as n
    `;
    // A call's cost, model, time and key changed after its day was rolled up.
    await db.sql`
      update proxy_calls
      set cost_cents = cost_cents + 7.000001, model = 'changed', created_at = created_at - interval '25 hours',
          api_key_id = ${keys[2] as string}
      where tenant_id = ${tenantId}
        and id in (
          select id from proxy_calls
          where tenant_id = ${tenantId} and created_at < date_trunc('day', now(), 'UTC') - interval '3 days'
          order by id limit 40
        )
    `;
    await db.sql`
      delete from proxy_calls
      where tenant_id = ${tenantId}
        and id in (select id from proxy_calls where tenant_id = ${tenantId} and model = 'B' order by id limit 100)
    `;
    expect(await rollupMismatches(db.sql)).to.equal(0);
    await expectReportsExact(24, 60);
    await expectUsageMatches(29, 20);
  });

  it("folds the calls written for rolled-up days into the rollups on the job's next run", async () => {
    const [before]: [{ n: bigint }?] = await db.sql`select count(*) as n from proxy_call_late`;
    expect(Number(before?.n)).to.be.above(0);
    await rollUpClosedDays(db.sql);
    const [after]: [{ n: bigint }?] = await db.sql`select count(*) as n from proxy_call_late`;
    expect(after?.n).to.equal(0n);
    expect(await rollupMismatches(db.sql)).to.equal(0);
    await expectReportsExact(28, 30);
  });

  it("add up to FetchKeyUsage for every key and window", async () => {
    await expectUsageMatches(25, 30);
  });

  it("are exact above 2^53 cents, in the rollups and in half-up rounding", async () => {
    const key = keys[3] as string;
    // 1,000 calls of 9,999,999,999,999.5 cents each, on a rolled-up day.
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
      select ${tenantId}, ${key}, date_trunc('day', now(), 'UTC') - interval '2 days' + n * interval '1 second',
             9999999999999.5, 'huge'
      from generate_series(1, 1000) as n
    `;
    const since = nowUs - 3n * dayUs;
    const [row] = await report(db.sql, tenantId, {
      keyIds: [key],
      sinceUs: since - (since % dayUs),
      untilUs: nowUs,
      width: "none",
      byKey: false,
      byModel: true,
      order: "spend",
      limit: 1,
    });
    expect(row?.model).to.equal("huge");
    expect(row?.spend_cents_exact).to.equal("9999999999999500");
    expect(row?.spend_cents).to.equal(9_999_999_999_999_500n);
    expect(await rollupMismatches(db.sql)).to.equal(0);
  });

  it("equal it with model names of any length, and calls at ±infinity, before and after the job", async () => {
    const key = keys[4] as string;
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
      select ${tenantId}::uuid, ${key}::uuid, date_trunc('day', now(), 'UTC') - n * interval '1 day' + interval '1 hour',
             1.5, repeat('m', 5000 + n)
      from generate_series(1, 3) as n
      union all
      select ${tenantId}::uuid, ${key}::uuid, at::timestamptz, 1, 'odd'
      from unnest(array['infinity', '-infinity']) as at
    `;
    await expectReportsExact(26, 20);
    await rollUpClosedDays(db.sql);
    expect(await rollupMismatches(db.sql)).to.equal(0);
    await expectReportsExact(27, 20);
    await db.sql`delete from proxy_calls where tenant_id = ${tenantId} and not isfinite(created_at)`;
  });

  it("stay exact when the rollups they were planned on are emptied for a rebuild, and after it", async () => {
    await rollUpClosedDays(db.sql);
    // Reports to now and to a fixed end, each planned on the days rolled up now.
    const shape = { keyIds: [keys[0] as string], sinceUs: nowUs - 15n * dayUs, width: "day", byKey: false } as const;
    const toNow = { ...shape, byModel: true, order: "time", limit: 1000 } as const;
    const before = await report(db.sql, tenantId, { ...toNow, untilUs: nowUs });
    expect(before).to.have.length.above(10);
    expect(await report(db.sql, tenantId, toNow)).to.have.length.at.least(before.length);
    await db.sql.begin(async (tx) => {
      await tx`delete from proxy_call_daily`;
      await tx`delete from proxy_call_hourly`;
      await tx`delete from proxy_call_spans`;
      await tx`delete from proxy_call_running`;
      await tx`delete from proxy_call_late`;
      await tx`update usage_rollup_state set rolled_from = null, rolled_until = null`;
    });
    expect(await report(db.sql, tenantId, { ...toNow, untilUs: nowUs })).to.deep.equal(before);
    expect(await report(db.sql, tenantId, toNow)).to.have.length.at.least(before.length);
    await rollUpClosedDays(db.sql, { maxDays: 5 });
    expect(await report(db.sql, tenantId, { ...toNow, untilUs: nowUs })).to.deep.equal(before);
    await rollUpClosedDays(db.sql);
    expect(await report(db.sql, tenantId, { ...toNow, untilUs: nowUs })).to.deep.equal(before);
    expect(await rollupMismatches(db.sql)).to.equal(0);
    await expectReportsExact(29, 20);
  });

  it("start no further back than two years, whatever odd instant a call has", async () => {
    const fresh = await createTestDatabase();
    try {
      const key = await insertKey(fresh.sql, { tenantId });
      await fresh.sql`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
        values (${tenantId}, ${key}, '0001-01-01 00:00:00+00', 1), (${tenantId}, ${key}, '3000-01-01 00:00:00+00', 1)
      `;
      await rollUpClosedDays(fresh.sql, { maxDays: 1 });
      const [state]: [{ back: number }?] = await fresh.sql`
        select ((now() at time zone 'UTC')::date - rolled_from)::int4 as back from usage_rollup_state
      `;
      expect(state?.back).to.equal(731);
      const outcome = await fetchUsageReport(fresh.sql, tenantId, {
        sinceUs: -62_135_596_800_000_000n,
        untilUs: 253_402_300_799_000_000n,
        width: "none",
        byKey: false,
        byModel: false,
        order: "time",
        limit: 10,
      });
      expect(outcome.kind === "done" && outcome.rows.map((r) => r.request_count)).to.deep.equal([2n]);
    } finally {
      await fresh.drop();
    }
  });

  it("rank keys by spend exactly when their running totals pass int8 in millionths of a cent", async () => {
    const fresh = await createTestDatabase();
    try {
      const [rich, modest] = [await insertKey(fresh.sql, { tenantId }), await insertKey(fresh.sql, { tenantId })];
      // 6e12 cents is 6e18 millionths, within int8; two of them in different
      // 32-day blocks sum past it; 1e13 cents is past it on its own.
      await fresh.sql`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
        select ${tenantId}::uuid, ${rich}::uuid, date_trunc('day', now(), 'UTC') - days * interval '1 day', cost
        from (values (40, 6000000000000.000001), (20, 10000000000000), (5, 6000000000000)) as c (days, cost)
        union all
        select ${tenantId}::uuid, ${modest}::uuid, date_trunc('day', now(), 'UTC') - n * interval '1 day', 0.000001
        from generate_series(1, 45) as n
      `;
      await rollUpClosedDays(fresh.sql);
      const [held]: [{ wide: number }?] = await fresh.sql`
        select count(*)::int4 as wide from proxy_call_running where spend_cents is not null
      `;
      expect(held?.wide).to.be.above(0);
      const today = nowUs - (nowUs % dayUs);
      for (const sinceUs of [today - 45n * dayUs, today - 41n * dayUs, today - 21n * dayUs]) {
        const shape = { sinceUs, untilUs: today, width: "none", byKey: true, byModel: false, order: "spend" } as const;
        const got = await report(fresh.sql, tenantId, { ...shape, limit: 10 });
        expect(got).to.deep.equal(await groupByReport(fresh.sql, tenantId, shape));
      }
      const [top] = await report(fresh.sql, tenantId, {
        sinceUs: today - 45n * dayUs,
        untilUs: today,
        width: "none",
        byKey: true,
        byModel: false,
        order: "spend",
        limit: 1,
      });
      expect(top).to.include({ key_id: rich, spend_cents_exact: "22000000000000.000001" });
      expect(await rollupMismatches(fresh.sql)).to.equal(0);
    } finally {
      await fresh.drop();
    }
  });

  it("build the running totals of days already rolled up from their one-day spans (migration 0006)", async () => {
    const migration = await readFile(
      new URL("../src/schema/migrations/0006_usage_running_totals.sql", import.meta.url),
      "utf8",
    );
    const start = migration.indexOf("insert into proxy_call_running");
    const fill = migration.slice(start, migration.indexOf(") as totals;", start) + ") as totals".length);
    // Late calls of rolled-up days: some folded into the spans, some still waiting.
    const key = keys[2] as string;
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
      select ${tenantId}, ${key}, date_trunc('day', now(), 'UTC') - n * interval '1 day' + interval '3 hours', 2.25, 'late'
      from generate_series(1, 12) as n
    `;
    await rollUpClosedDays(db.sql);
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
      select ${tenantId}, ${key}, date_trunc('day', now(), 'UTC') - n * interval '1 day' + interval '5 hours', 0.5
      from generate_series(2, 9) as n
    `;
    const before = await db.sql`select * from proxy_call_running order by day, tenant_id, api_key_id`;
    expect(before).to.have.length.above(100);
    await db.sql.begin(async (tx) => {
      await tx`delete from proxy_call_running`;
      await tx.unsafe(fill);
    });
    expect(await db.sql`select * from proxy_call_running order by day, tenant_id, api_key_id`).to.deep.equal(before);
    expect(await rollupMismatches(db.sql)).to.equal(0);
    await expectReportsExact(30, 20);
  });

  it("are kept by a job that folds many late rows in batches and outlasts the rpcs' statement limit", async () => {
    const fresh = await createTestDatabase();
    // The rpcs' limit, far too short for the job's statements here.
    const limited = createSql({
      url: fresh.url,
      poolMax: 2,
      statementTimeoutMs: 5,
      applicationName: "keys-driver-tests",
    });
    try {
      const key = await insertKey(fresh.sql, { tenantId });
      await fresh.sql`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
        select ${tenantId}, ${key}, date_trunc('day', now(), 'UTC') - interval '3 days' + (n % 86400) * interval '1 second',
               0.25, 'm' || (n % 700)
        from generate_series(1, 60000) as n
      `;
      expect((await rollUpClosedDays(limited)).days).to.have.length.above(0);
      // A late row per hour and model of a rolled-up day: more than a batch.
      await fresh.sql`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
        select ${tenantId}, ${key}, date_trunc('day', now(), 'UTC') - interval '2 days' + (n % 24) * interval '1 hour',
               1.5, 'late' || (n / 24)
        from generate_series(0, 24 * 600 - 1) as n
      `;
      const [late]: [{ n: number }?] = await fresh.sql`select count(*)::int4 as n from proxy_call_late`;
      expect(late?.n).to.equal(24 * 600);
      await rollUpClosedDays(limited);
      const [left]: [{ n: number }?] = await fresh.sql`select count(*)::int4 as n from proxy_call_late`;
      expect(left?.n).to.equal(0);
      expect(await rollupMismatches(fresh.sql)).to.equal(0);
    } finally {
      await limited.end();
      await fresh.drop();
    }
  });

  it("hold no row for a TRUNCATE of proxy_calls, which empties the rollups with it", async () => {
    await db.sql`truncate proxy_calls`;
    const counts =
      await db.sql`select (select count(*) from proxy_call_daily) as d, (select count(*) from proxy_call_hourly) as h`;
    expect(counts[0]).to.deep.equal({ d: 0n, h: 0n });
    expect(
      await report(db.sql, tenantId, {
        sinceUs: nowUs - 30n * dayUs,
        untilUs: nowUs,
        width: "day",
        byKey: true,
        byModel: true,
        order: "time",
        limit: 10,
      }),
    ).to.deep.equal([]);
  });
});

describe("proxy_calls' writers and the rollup job", () => {
  let db: TestDatabase;
  let tenantId: string;
  let keyId: string;
  const daysAgo = (n: number) => new Date(Date.now() - n * 86_400_000).toISOString();

  before(async () => {
    db = await createTestDatabase();
    tenantId = newTenant();
    keyId = await insertKey(db.sql, { tenantId });
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
      select ${tenantId}, ${keyId}, date_trunc('day', now(), 'UTC') - n * interval '1 hour' + interval '1 minute', 1
      from generate_series(1, 100) as n
    `;
    // Every closed day but yesterday: yesterday is the one the job rolls up next.
    const [closed]: [{ n: number }?] = await db.sql`
      select ((now() at time zone 'UTC')::date - (min(created_at) at time zone 'UTC')::date)::int4 as n
      from proxy_calls
    `;
    await rollUpClosedDays(db.sql, { maxDays: (closed?.n ?? 1) - 1 });
  });
  after(async () => {
    await db?.drop();
  });

  const insert = (calls: string[], isolation = "read committed") =>
    db.sql.begin(async (tx) => {
      await tx.unsafe(`set transaction isolation level ${isolation}`);
      await tx`set local lock_timeout = '1s'`;
      await tx`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
        select ${tenantId}, ${keyId}, at::timestamptz, 1
        from unnest(${arrayLiteral(calls)}::text[]) as at
      `;
      const [locks]: [{ n: number }?] = await tx`
        select count(*)::int4 as n from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()
      `;
      return locks?.n ?? 0;
    });
  const outcome = (promise: Promise<unknown>) =>
    promise.then(
      () => "done",
      (err: { code?: string }) => err.code,
    );

  it("today's calls do not wait while the job sums a day; only that day's late calls do", async () => {
    // Another session holds what the job holds while it sums yesterday: the
    // state row, and the locks of every day and of yesterday, exclusively.
    const held = await db.sql.reserve();
    try {
      await held`begin`;
      await held`select * from usage_rollup_state for update`;
      await held`
        select pg_try_advisory_xact_lock(7301944, usage_all_days_lock_key()),
               pg_try_advisory_xact_lock(7301944, usage_day_lock_key((now() at time zone 'UTC')::date - 1))
      `;
      const started = performance.now();
      expect(await insert([new Date().toISOString()]), "locks of a call of today").to.equal(1);
      expect(await insert([daysAgo(2), daysAgo(3)]), "locks of late calls of rolled-up days").to.equal(2);
      expect(performance.now() - started).to.be.below(900);
      // The day the job holds: a late call for it waits (here, past lock_timeout);
      // so do calls of many days, and a writer at REPEATABLE READ.
      expect(await outcome(insert([daysAgo(1)]))).to.equal("55P03");
      const manyDays = Array.from({ length: 40 }, (_, i) => new Date(Date.now() + i * 86_400_000).toISOString());
      expect(await outcome(insert(manyDays))).to.equal("55P03");
      expect(await outcome(insert([new Date().toISOString()], "repeatable read"))).to.equal("55P03");
    } finally {
      await held`rollback`;
      held.release();
    }
  });

  it("a transaction holds a few locks, however many statements write calls of open days", async () => {
    const locks = await db.sql.begin(async (tx) => {
      for (let i = 0; i < 40; i++) {
        await tx`
          insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
          values (${tenantId}, ${keyId}, now() + ${i} * interval '1 day', 1)
        `;
      }
      const [row]: [{ n: number }?] = await tx`
        select count(*)::int4 as n from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()
      `;
      return row?.n ?? 0;
    });
    expect(locks).to.be.at.most(17);
    await db.sql`delete from proxy_calls where tenant_id = ${tenantId} and created_at > now() + interval '1 hour'`;
  });

  it("the job does not queue behind a writer at REPEATABLE READ, it comes back", async () => {
    const writer = await db.sql.reserve();
    try {
      await writer`begin isolation level repeatable read`;
      await writer`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
        values (${tenantId}, ${keyId}, now(), 1)
      `;
      const started = performance.now();
      const run = await rollUpClosedDays(db.sql);
      expect(run.days).to.deep.equal([]);
      expect(performance.now() - started).to.be.below(5000);
      await writer`commit`;
    } finally {
      writer.release();
    }
  });

  it("a statement holds a few locks, whatever the days of its calls", async () => {
    const days = Array.from({ length: 5000 }, (_, i) => new Date(Date.now() - (i - 2500) * 86_400_000).toISOString());
    expect(await insert(days)).to.equal(1);
    expect(await insert(days.slice(2502, 2509))).to.equal(7);
  });

  it("rolls up a day its writers are using as soon as they are done, exactly", async () => {
    const writer = await db.sql.reserve();
    try {
      await writer`begin`;
      await writer`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
        values (${tenantId}, ${keyId}, ${daysAgo(1)}::timestamptz, 5)
      `;
      const job = rollUpClosedDays(db.sql);
      await new Promise((resolve) => setTimeout(resolve, 200));
      await writer`commit`;
      expect((await job).days).to.have.length(1);
    } finally {
      writer.release();
    }
    const [check]: [{ rolled: bigint; raw: bigint }?] = await db.sql`
      select
        (select sum(request_count) from proxy_call_daily where tenant_id = ${tenantId})::int8 as rolled,
        (select count(*) from proxy_calls, usage_rollup_state
         where tenant_id = ${tenantId}
           and created_at >= rolled_from::timestamp at time zone 'UTC'
           and created_at < rolled_until::timestamp at time zone 'UTC')::int8 as raw
    `;
    expect(check?.rolled).to.equal(check?.raw);
  });

  it("late calls of one key never wait for each other, nor stop the job", async () => {
    const first = await db.sql.reserve();
    try {
      await first`begin`;
      await first`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
        values (${tenantId}, ${keyId}, ${daysAgo(3)}::timestamptz, 2)
      `;
      // Another late call of the same key, a day later, while the first is open.
      expect(await insert([daysAgo(2)])).to.equal(1);
      const run = await rollUpClosedDays(db.sql);
      expect(run.ran).to.equal(true);
      await first`commit`;
    } finally {
      first.release();
    }
    await rollUpClosedDays(db.sql);
    const [late]: [{ n: bigint }?] = await db.sql`select count(*) as n from proxy_call_late`;
    expect(late?.n).to.equal(0n);
  });
});

describe("FetchUsageReport over the network", () => {
  const service = useTestService();

  for (const makeCaller of [connectGrpcCaller, grpcJsCaller]) {
    describe(`called through ${makeCaller === grpcJsCaller ? "@grpc/grpc-js" : "connect-node"}`, () => {
      let client: JsonCaller;
      let tenantId: string;
      let keys: string[];
      before(async () => {
        client = makeCaller(service.server.address);
        tenantId = newTenant();
        keys = [];
        for (let i = 0; i < 3; i++) keys.push(await insertKey(service.db.sql, { tenantId }));
        await service.db.sql`
          insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents, model)
          select ${tenantId}, (${arrayLiteral(keys)}::uuid[])[1 + n % 3],
                 timestamptz '2026-03-01 00:00:00+00' + n * interval '37 minutes', n / 1000.0,
                 case when n % 2 = 0 then 'small-1' else 'large-2' end
          from generate_series(1, 300) as n
        `;
      });
      after(() => client.close());

      const window = { since: "2026-03-01T00:00:00Z", until: "2026-03-08T00:00:00Z" };

      it("answers daily buckets per key and model, with the window as applied", async () => {
        const res = await client.call("FetchUsageReport", {
          tenantId,
          keyIds: [(keys[0] as string).toUpperCase()],
          ...window,
          bucketWidth: "USAGE_BUCKET_WIDTH_DAY",
          groupBy: ["USAGE_GROUPING_KEY", "USAGE_GROUPING_MODEL"],
        });
        expect(res.since).to.equal("2026-03-01T00:00:00Z");
        expect(res.until).to.equal("2026-03-08T00:00:00Z");
        const rows = res.rows as Record<string, string>[];
        const want = await groupByReport(service.db.sql, tenantId, {
          keyIds: [keys[0] as string],
          sinceUs: 1_772_323_200_000_000n,
          untilUs: 1_772_928_000_000_000n,
          width: "day",
          byKey: true,
          byModel: true,
          order: "time",
        });
        expect(want.length).to.be.above(6);
        expect(rows).to.deep.equal(
          want.map((r) => ({
            bucketStart: new Date(Number(r.bucket_us / 1000n)).toISOString().replace(".000Z", "Z"),
            keyId: r.key_id,
            model: r.model,
            requestCount: String(r.request_count),
            ...(r.spend_cents === 0n ? {} : { spendCents: String(r.spend_cents) }),
            spendCentsExact: r.spend_cents_exact,
          })),
        );
        expect(new Set(rows.map((r) => r.keyId))).to.deep.equal(new Set([keys[0]]));
        expect(res.nextPageToken ?? "").to.equal("");
      });

      it("pages through a report in either order, each row once, the window fixed by the first page", async () => {
        for (const orderBy of ["USAGE_REPORT_ORDER_UNSPECIFIED", "USAGE_REPORT_ORDER_SPEND_DESCENDING"]) {
          const request = {
            tenantId,
            since: window.since,
            bucketWidth: "USAGE_BUCKET_WIDTH_HOUR",
            groupBy: ["USAGE_GROUPING_MODEL", "USAGE_GROUPING_KEY"],
            orderBy,
          };
          const whole = await client.call("FetchUsageReport", { ...request, pageSize: 1000 });
          const paged: unknown[] = [];
          let until: unknown;
          let pageToken = "";
          do {
            const page = await client.call("FetchUsageReport", { ...request, pageSize: 7, pageToken });
            until ??= page.until;
            expect(page.until).to.equal(until);
            paged.push(...((page.rows as unknown[]) ?? []));
            pageToken = (page.nextPageToken as string | undefined) ?? "";
            // A call made after the first page is past the window it fixed.
            await service.db.sql`
              insert into proxy_calls (tenant_id, api_key_id, cost_cents, model)
              values (${tenantId}, ${keys[1] as string}, 99, 'small-1')
            `;
          } while (pageToken !== "");
          expect(paged.length).to.be.above(100);
          expect(paged).to.deep.equal(whole.rows);
        }
      });

      it("says which field is wrong", async () => {
        const base = { tenantId, ...window };
        const cases: [JsonObject, string][] = [
          [{ ...base, bucketWidth: 7 }, "bucket_width"],
          [{ ...base, groupBy: ["USAGE_GROUPING_UNSPECIFIED"] }, "group_by[0]"],
          [{ ...base, groupBy: ["USAGE_GROUPING_KEY", 9] }, "group_by[1]"],
          [{ ...base, orderBy: 5 }, "order_by"],
          [{ tenantId }, "since"],
          [{ ...base, since: window.until, until: window.since }, "since"],
          [{ tenantId, since: "2999-01-01T00:00:00Z" }, "since"],
          [{ ...base, keyIds: [keys[0] as string, "nope"] }, "key_ids[1]"],
          [{ ...base, keyIds: Array.from({ length: 1001 }, () => randomUUID()) }, "key_ids"],
          [{ ...base, pageSize: -1 }, "page_size"],
          [{ ...base, pageToken: "AAAA" }, "page_token"],
          [{ ...base, tenantId: "x" }, "tenant_id"],
        ];
        for (const [request, field] of cases) {
          const err = await failure(client.call("FetchUsageReport", request));
          expect(err.code, `${JSON.stringify(request).slice(0, 200)}: ${err.rawMessage}`).to.equal(
            Code.InvalidArgument,
          );
          expect(err.rawMessage).to.contain(field);
        }
      });

      it("gives the int64 maximum for a spend beyond it, and the exact sum beside it", async () => {
        const rich = newTenant();
        const key = await insertKey(service.db.sql, { tenantId: rich });
        await service.db.sql`
          insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
          select ${rich}, ${key}, timestamptz '2026-03-02 00:00:00+00' + n * interval '1 second', 99999999999999.999999
          from generate_series(1, 100000) as n
        `;
        const res = await client.call("FetchUsageReport", { tenantId: rich, ...window });
        expect(res.rows).to.deep.equal([
          {
            bucketStart: window.since,
            requestCount: "100000",
            spendCents: "9223372036854775807",
            spendCentsExact: "9999999999999999999.9",
          },
        ]);
      });

      it("counts a key named twice once", async () => {
        const res = await client.call("FetchUsageReport", {
          tenantId,
          keyIds: [...Array.from({ length: 1500 }, () => keys[0] as string), (keys[0] as string).toUpperCase()],
          ...window,
          groupBy: ["USAGE_GROUPING_KEY"],
        });
        expect((res.rows as { keyId: string }[]).map((r) => r.keyId)).to.deep.equal([keys[0]]);
      });

      it("refuses a page token edited, or issued for another tenant or another report", async () => {
        const request = { tenantId, ...window, bucketWidth: "USAGE_BUCKET_WIDTH_HOUR", pageSize: 2 };
        const first = await client.call("FetchUsageReport", request);
        const token = first.nextPageToken as string;
        const edited = `${token.slice(0, -1)}${token.endsWith("A") ? "B" : "A"}`;
        for (const other of [
          { ...request, pageToken: edited },
          { ...request, pageToken: token, bucketWidth: "USAGE_BUCKET_WIDTH_DAY" },
          { ...request, pageToken: token, groupBy: ["USAGE_GROUPING_MODEL"] },
          { ...request, pageToken: token, until: "2026-03-09T00:00:00Z" },
          { ...request, pageToken: token, tenantId: newTenant() },
        ]) {
          const err = await failure(client.call("FetchUsageReport", other));
          expect(err.code).to.equal(Code.InvalidArgument);
          expect(err.rawMessage).to.contain("page_token");
        }
        const second = await client.call("FetchUsageReport", { ...request, pageToken: token });
        expect(second.rows).to.have.length(2);
      });

      it("keeps tenants apart: another tenant's key is NOT_FOUND, its calls are never counted", async () => {
        const other = newTenant();
        const otherKey = await insertKey(service.db.sql, { tenantId: other });
        await service.db.sql`
          insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
          values (${other}, ${otherKey}, '2026-03-02 00:00:00+00', 5), (${other}, ${keys[0] as string}, '2026-03-02 00:00:00+00', 5)
        `;
        const err = await failure(
          client.call("FetchUsageReport", { tenantId, keyIds: [keys[0] as string, otherKey], ...window }),
        );
        expect(err.code).to.equal(Code.NotFound);
        const mine = await client.call("FetchUsageReport", { tenantId, ...window });
        expect((mine.rows as { requestCount: string }[])[0]?.requestCount).to.equal("272");
        const theirs = await client.call("FetchUsageReport", {
          tenantId: other,
          ...window,
          groupBy: ["USAGE_GROUPING_KEY"],
        });
        expect((theirs.rows as { keyId: string }[]).map((r) => r.keyId).sort()).to.deep.equal(
          [otherKey, keys[0]].sort(),
        );
        const none = await client.call("FetchUsageReport", { tenantId: newTenant(), ...window });
        expect(none.rows ?? []).to.deep.equal([]);
      });
    });
  }
});

import { randomUUID } from "node:crypto";
import { expect } from "chai";
import { arrayLiteral } from "../src/db/client.js";
import { fetchKeyUsage } from "../src/db/usage.js";
import { rollUpClosedDays } from "../src/jobs/rollup.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { generator, insertKey, newTenant } from "./support/fixtures.js";

const dayUs = 86_400_000_000n;

describe("FetchKeyUsage's daily rollup", () => {
  let db: TestDatabase;
  let tenantId: string;
  let keys: string[];
  let nowUs: bigint;

  /** Calls spread over the last `days` days for each key, with fractional costs. */
  async function insertSpread(count: number, days: number, seed: number) {
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
      select
        ${tenantId},
        (${arrayLiteral(keys)}::uuid[])[1 + (n * 7 + ${seed}) % ${keys.length}],
        now() - ((n::int8 * 2654435761 + ${seed}) % (${days}::int8 * 86400000)) * interval '1 millisecond'
              - (n % 1000) * interval '1 microsecond',
        ((n * 31 + ${seed}) % 100000) / 10000.0
      from generate_series(1, ${count}) as n
    `;
  }

  async function rawSum(keyId: string, sinceUs: bigint, untilUs: bigint) {
    const [row]: [{ n: bigint; s: string }?] = await db.sql`
      select count(*) as n, coalesce(trim_scale(sum(cost_cents)), 0)::text as s
      from proxy_calls
      where tenant_id = ${tenantId} and api_key_id = ${keyId}
        and created_at >= to_timestamp(0) + ${sinceUs.toString()}::int8 * interval '1 microsecond'
        and created_at < to_timestamp(0) + ${untilUs.toString()}::int8 * interval '1 microsecond'
    `;
    return { count: row?.n, exact: row?.s };
  }

  /** Rows where the rollup and a fresh GROUP BY of proxy_calls disagree. */
  async function rollupMismatches(): Promise<number> {
    const [row]: [{ n: bigint }?] = await db.sql`
      with state as (select rolled_from, rolled_until from usage_rollup_state),
      fresh as (
        select tenant_id, api_key_id, (created_at at time zone 'UTC')::date as day,
               count(*) as request_count, sum(cost_cents) as spend_cents
        from proxy_calls, state
        where created_at >= rolled_from::timestamp at time zone 'UTC'
          and created_at < rolled_until::timestamp at time zone 'UTC'
        group by 1, 2, 3
      ),
      kept as (
        select tenant_id, api_key_id, day, request_count, spend_cents
        from proxy_call_daily
        where request_count <> 0
      )
      select count(*) as n from (
        (select * from fresh except select * from kept)
        union all
        (select * from kept except select * from fresh)
      ) as diff
    `;
    return Number(row?.n);
  }

  async function expectWindowsExact(seed: number, windows: number) {
    const random = generator(seed);
    for (let i = 0; i < windows; i++) {
      const keyId = keys[Math.floor(random() * keys.length)] as string;
      const a = nowUs - BigInt(Math.floor(random() * 25 * 86_400_000_000));
      const b = nowUs - BigInt(Math.floor(random() * 25 * 86_400_000_000));
      const [sinceUs, untilUs] = a <= b ? [a, b] : [b, a];
      // Every fifth window is a whole number of UTC days, edges at midnight.
      const since = i % 5 === 0 ? sinceUs - (sinceUs % dayUs) : sinceUs;
      const until = i % 5 === 0 ? untilUs - (untilUs % dayUs) : untilUs;
      const got = await fetchKeyUsage(db.sql, tenantId, keyId, { sinceUs: since, untilUs: until });
      const want = await rawSum(keyId, since, until);
      expect(
        { count: got?.request_count, exact: got?.spend_cents_exact },
        `window ${i} [${since}, ${until})`,
      ).to.deep.equal(want);
    }
  }

  before(async () => {
    db = await createTestDatabase();
    tenantId = newTenant();
    keys = [];
    for (let i = 0; i < 4; i++) keys.push(await insertKey(db.sql, { tenantId }));
    await insertSpread(6000, 20, 1);
    const [now]: [{ us: bigint }?] = await db.sql`select epoch_micros(now()) as us`;
    nowUs = now?.us ?? 0n;
  });
  after(async () => {
    await db?.drop();
  });

  it("equals the raw SUM and COUNT on random windows before the first rollup", async () => {
    await expectWindowsExact(11, 20);
  });

  it("rolls up every closed day, resumes after stopping part-way, and a rerun changes nothing", async () => {
    const partial = await rollUpClosedDays(db.sql, { maxDays: 5 });
    expect(partial.days).to.have.length(5);
    const rest = await rollUpClosedDays(db.sql);
    expect(rest.days.length).to.be.within(15, 16);
    expect(new Set([...partial.days, ...rest.days]).size).to.equal(partial.days.length + rest.days.length);
    expect((await rollUpClosedDays(db.sql)).days).to.deep.equal([]);
    expect(await rollupMismatches()).to.equal(0);
  });

  it("equals the raw SUM and COUNT on random windows once the rollup is used", async () => {
    await expectWindowsExact(12, 60);
  });

  it("counts calls that arrive late for a rolled-up day, and forgets deleted ones", async () => {
    const keyId = keys[0] as string;
    const since = nowUs - 10n * dayUs - (nowUs % dayUs);
    const until = since + 3n * dayUs;
    const before = await fetchKeyUsage(db.sql, tenantId, keyId, { sinceUs: since, untilUs: until });
    await db.sql`
      insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
      values
        (${tenantId}, ${keyId}, to_timestamp(0) + ${(since + dayUs + 5n).toString()}::int8 * interval '1 microsecond', 0.333333),
        (${tenantId}, ${keyId}, to_timestamp(0) + ${(since + dayUs + 6n).toString()}::int8 * interval '1 microsecond', 0.000001)
    `;
    const after = await fetchKeyUsage(db.sql, tenantId, keyId, { sinceUs: since, untilUs: until });
    expect(after?.request_count).to.equal((before?.request_count ?? 0n) + 2n);
    expect(await rawSum(keyId, since, until)).to.deep.equal({
      count: after?.request_count,
      exact: after?.spend_cents_exact,
    });
    await db.sql`
      delete from proxy_calls
      where tenant_id = ${tenantId} and api_key_id = ${keyId} and cost_cents in (0.333333, 0.000001)
    `;
    const deleted = await fetchKeyUsage(db.sql, tenantId, keyId, { sinceUs: since, untilUs: until });
    expect([deleted?.request_count, deleted?.spend_cents_exact]).to.deep.equal([
      before?.request_count,
      before?.spend_cents_exact,
    ]);
    expect(await rollupMismatches()).to.equal(0);
  });

  it("stays exact when late calls race the job, with several workers at once", async () => {
    const fresh = await createTestDatabase();
    try {
      const tenant = newTenant();
      const keyId = randomUUID();
      await fresh.sql`
        insert into api_keys (tenant_id, id, key_prefix, key_hash) values (${tenant}, ${keyId}, 'sk', '\\x00')
      `;
      const insertDay = (daysAgo: number, n: number) => fresh.sql`
        insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
        select ${tenant}, ${keyId}, date_trunc('day', now(), 'UTC') - ${daysAgo} * interval '1 day' + g * interval '1 second', 0.5
        from generate_series(1, ${n}) as g
      `;
      for (let d = 1; d <= 30; d++) await insertDay(d, 50);
      // Three workers, and a writer adding late calls to days they are rolling up.
      const writer = (async () => {
        for (let i = 0; i < 30; i++) await insertDay(1 + (i % 30), 3);
      })();
      const runs = await Promise.all([
        rollUpClosedDays(fresh.sql),
        rollUpClosedDays(fresh.sql),
        rollUpClosedDays(fresh.sql),
      ]);
      await writer;
      await rollUpClosedDays(fresh.sql);
      const rolled = runs.flatMap((r) => r.days);
      expect(new Set(rolled).size, "no day rolled up twice").to.equal(rolled.length);
      const [check]: [{ daily: bigint; raw: bigint }?] = await fresh.sql`
        select
          (select sum(request_count) from proxy_call_daily where tenant_id = ${tenant})::int8 as daily,
          (select count(*) from proxy_calls where tenant_id = ${tenant})::int8 as raw
      `;
      expect(check?.daily).to.equal(check?.raw);
      expect(check?.raw).to.equal(30n * 50n + 30n * 3n);
    } finally {
      await fresh.drop();
    }
  });
});

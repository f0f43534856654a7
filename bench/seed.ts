// Generates the benchmark's synthetic data set, deterministically: the same
// scale gives the same tenants, keys and calls. Bulk INSERT ... SELECT in
// batches inside the database, with proxy_calls' indexes built after the
// load, then the usage rollup and VACUUM ANALYZE.
import type { Sql } from "../src/db/client.js";
import { rollUpClosedDays } from "../src/jobs/rollup.js";

/** How big a data set to make. */
export interface Scale {
  readonly tenants: number;
  readonly keys: number;
  readonly calls: number;
  readonly days: number;
  /** Tenants with `bigTenantKeys` keys each (the deep-paging tenants). */
  readonly bigTenants: number;
  readonly bigTenantKeys: number;
  /** Keys that get half of all calls between them. */
  readonly hotKeys: number;
}

/** The default bench scale. */
export const benchScale: Scale = {
  tenants: 1000,
  keys: 100_000,
  calls: 10_000_000,
  days: 90,
  bigTenants: 3,
  bigTenantKeys: 20_000,
  hotKeys: 5,
};

/** A small scale for trying the benchmark out quickly. */
export const smallScale: Scale = {
  tenants: 50,
  keys: 5000,
  calls: 200_000,
  days: 90,
  bigTenants: 2,
  bigTenantKeys: 2000,
  hotKeys: 2,
};

/** Calls start at this instant and cover `days` days from it. */
export const dataStart = "2026-08-01T00:00:00Z";

function progress(label: string, done: number, total: number, started: number) {
  const elapsed = (performance.now() - started) / 1000;
  const fraction = total === 0 ? 1 : done / total;
  const eta = fraction > 0 ? elapsed / fraction - elapsed : 0;
  const width = 30;
  const bar = "#".repeat(Math.round(fraction * width)).padEnd(width, ".");
  const line = `${label} [${bar}] ${(fraction * 100).toFixed(0).padStart(3)}% ${done.toLocaleString("en")}/${total.toLocaleString("en")}  ${elapsed.toFixed(0)}s elapsed, ETA ${eta.toFixed(0)}s`;
  if (process.stderr.isTTY) process.stderr.write(`\r${line}${done === total ? "\n" : ""}`);
  else if (done === total || Math.round(fraction * 10) !== Math.round(((done - 1) / total) * 10)) console.error(line);
}

/** True when the database already holds this exact data set. */
export async function isSeeded(sql: Sql, scale: Scale): Promise<boolean> {
  const rows = await sql<{ same: boolean }[]>`
    select scale = ${JSON.stringify(scale)}::jsonb as same
    from bench.seeded
  `.catch(() => []);
  return rows[0]?.same === true;
}

/** Replaces the service tables' contents with the data set at `scale`. */
export async function seed(sql: Sql, scale: Scale): Promise<void> {
  const started = performance.now();
  await sql.unsafe(`
    drop schema if exists bench cascade;
    create schema bench;
    truncate api_keys, key_events, proxy_calls, proxy_call_daily, proxy_call_hourly, proxy_call_spans, proxy_call_running, proxy_call_late;
    update usage_rollup_state set rolled_from = null, rolled_until = null;
  `);
  // The owner of key k: the big tenants first, then round-robin over the rest.
  await sql.unsafe(`
    create function bench.tenant_of(k bigint) returns uuid language sql immutable as $$
      select md5('tenant:' || case
        when k <= ${scale.bigTenants * scale.bigTenantKeys} then (k - 1) / ${scale.bigTenantKeys} + 1
        else ${scale.bigTenants} + 1 + (k - ${scale.bigTenants * scale.bigTenantKeys} - 1) % ${scale.tenants - scale.bigTenants}
      end)::uuid
    $$;
    create function bench.key_id(k bigint) returns uuid language sql immutable as $$
      select md5('key:' || k)::uuid
    $$;
  `);

  const keyBatch = 20_000;
  for (let lo = 1; lo <= scale.keys; lo += keyBatch) {
    const hi = Math.min(scale.keys, lo + keyBatch - 1);
    // Keys of a big tenant share created_at in threes, so paging must break ties.
    await sql`
      insert into api_keys (
        tenant_id, id, name, key_prefix, key_hash, status, is_frozen, frozen_at,
        created_at, last_used_at, total_requests
      )
      select
        bench.tenant_of(k), bench.key_id(k), 'key ' || k,
        'sk_live_' || substr(md5(k::text), 1, 4), sha256(('secret:' || k)::bytea),
        case when k % 17 = 0 then 'revoked' when k % 29 = 0 then 'expired' else 'active' end,
        k % 41 = 0,
        case when k % 41 = 0 then timestamptz '2026-07-01' end,
        timestamptz '2026-01-01' + (k / 3) * interval '1 minute',
        case when k % 3 <> 0 then timestamptz '2026-10-29' + (k % 1000) * interval '1 second' end,
        k % 100000
      from generate_series(${lo}::int8, ${hi}::int8) as k
    `;
    progress("keys ", hi, scale.keys, started);
  }

  // A log is written in time order; half of all calls go to the hot keys.
  await sql`alter table proxy_calls drop constraint proxy_calls_pkey`;
  await sql`drop index proxy_calls_key_time`;
  await sql`drop index proxy_calls_created_brin`;
  const callBatch = 500_000;
  const stepUs = Math.floor((scale.days * 86_400_000_000) / scale.calls);
  const callsStarted = performance.now();
  for (let lo = 1; lo <= scale.calls; lo += callBatch) {
    const hi = Math.min(scale.calls, lo + callBatch - 1);
    await sql`
      insert into proxy_calls (
        tenant_id, id, api_key_id, created_at, cost_cents, endpoint, model,
        prompt_tokens, completion_tokens, status_code, latency_ms
      )
      select
        bench.tenant_of(k), md5('call:' || n)::uuid, bench.key_id(k),
        ${dataStart}::text::timestamptz + (n - 1) * ${stepUs} * interval '1 microsecond',
        ((n * 7919) % 100000) / 10000.0,
        '/v1/chat/completions',
        case when n % 3 = 0 then 'large-2' else 'small-1' end,
        100 + n % 900, 20 + n % 400, case when n % 97 = 0 then 429 else 200 end, 50 + n % 950
      from generate_series(${lo}::int8, ${hi}::int8) as n
      cross join lateral (
        select case
          when n % 2 = 0 then 1 + (n / 2) % ${scale.hotKeys}
          else 1 + floor(${scale.keys} * power(((n * 2654435761) % 4294967291) / 4294967291.0, 2))::int8
        end as k
      ) as pick
    `;
    progress("calls", hi, scale.calls, callsStarted);
  }
  console.error("building proxy_calls' indexes ...");
  await sql`set maintenance_work_mem = '1GB'`;
  await sql`alter table proxy_calls add primary key (tenant_id, id)`;
  await sql`create index proxy_calls_key_time on proxy_calls (tenant_id, api_key_id, created_at) include (cost_cents)`;
  await sql`create index proxy_calls_created_brin on proxy_calls using brin (created_at)`;
  console.error("rolling up closed days ...");
  await rollUpClosedDays(sql);
  console.error("vacuum analyze ...");
  await sql`vacuum analyze api_keys`;
  await sql`vacuum analyze proxy_calls`;
  await sql`vacuum analyze proxy_call_daily`;
  await sql`vacuum analyze proxy_call_hourly`;
  await sql`vacuum analyze proxy_call_spans`;
  await sql`vacuum analyze proxy_call_running`;

  // Keys to look up, for pgbench's scripts.
  await sql`
    create table bench.sample (n int primary key, tenant_id uuid not null, key_id uuid not null)
  `;
  await sql`
    insert into bench.sample
    select i, bench.tenant_of(k), bench.key_id(k)
    from generate_series(1, 10000) as i
    cross join lateral (select 1 + (i::int8 * 7919) % ${scale.keys} as k) as pick
  `;
  await sql`create table bench.seeded (scale jsonb not null)`;
  await sql`insert into bench.seeded values (${JSON.stringify(scale)}::jsonb)`;
  console.error(`seeded in ${((performance.now() - started) / 1000).toFixed(0)}s`);
}

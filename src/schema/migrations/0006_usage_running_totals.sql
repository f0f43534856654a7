-- A tenant's keys ranked by spend over a window (FetchUsageReport without
-- buckets or models) read each key's running totals at a few days instead of
-- summing spans: the sum over whole days [a, b) is the running total at b - 1
-- less the one at a - 1 when both fall in one aligned 32-day block, and one
-- block's total more per block boundary in between. A 30-day window reads
-- three rows per key (about seven from the spans of 1 to 32 days).
--
-- Deploying: replicas of the previous version must not run on past this
-- migration. Their rollup job is held off while it runs (it takes the job's
-- lock), and afterwards their job and their whole-tenant reports fail (the
-- spans' span_days column is gone) rather than answer from spans no longer
-- kept. Migrate, then replace them.
select pg_advisory_xact_lock(7301944513);
--
-- A row holds one key's calls from the start of its block (or from
-- rolled_from, in the block that holds it) through `day`. Rows are dense: a
-- key with calls in a block has a row for every rolled-up day of that block
-- from its first call on, so that any day's total is one row. Like the other
-- rollups, they hold exactly the rolled-up days; calls written since for
-- those days wait in proxy_call_late until the job folds them in.
--
-- The spend is kept in millionths of a cent (cost_cents has six decimals)
-- while that fits in an int8: summing int8 is about twice as fast as numeric
-- for a tenant's 20,000 keys (docs/DESIGN.md). A total past int8 is kept in
-- spend_cents instead; exactly one of the two is set.
-- Keyed by day first, unlike the tables before (0001): the job carries a
-- day's totals of every tenant forward, and each report reads one day of
-- one tenant, a range either way.
create table proxy_call_running (
  day date not null,
  tenant_id uuid not null,
  api_key_id uuid not null,
  request_count bigint not null,
  spend_micros bigint,
  spend_cents numeric,
  check ((spend_micros is null) <> (spend_cents is null))
);
alter table proxy_call_running set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02);

-- A spend in cents as millionths of a cent, or null past int8.
create function usage_spend_micros(spend numeric) returns int8
language sql immutable parallel safe
return case when abs(spend) < 9223372036854.775807 then (spend * 1000000)::int8 end;

-- A spend in cents past what usage_spend_micros holds, or null.
create function usage_spend_overflow(spend numeric) returns numeric
language sql immutable parallel safe
return case when abs(spend) >= 9223372036854.775807 then spend end;

-- A running total's spend in cents, from whichever column holds it.
create function usage_running_spend(spend_micros int8, spend_cents numeric) returns numeric
language sql immutable parallel safe
return coalesce(spend_micros * 0.000001, spend_cents);

-- A sum of int8 as an int8, which fails (22003) past int8 where sum(int8)
-- gives a numeric: its state is a plain value rather than an allocated
-- 128-bit sum, which for a tenant's 20,000 keys makes a report by spend about
-- a third faster (docs/DESIGN.md). Reports that fail so are run again with
-- sum() (src/db/usage-report.ts).
create aggregate usage_int8_sum(int8) (
  sfunc = int8pl,
  stype = int8,
  combinefunc = int8pl,
  parallel = safe
);

-- Spans longer than a day served the per-key totals; only the one-day spans
-- (a whole tenant's days per key) are read now, and they lose their length.
delete from proxy_call_spans where span_days <> 1;
alter table proxy_call_spans drop constraint proxy_call_spans_pkey;
alter table proxy_call_spans drop column span_days;
alter table proxy_call_spans
  add primary key (tenant_id, first_day, api_key_id) include (request_count, spend_cents);

-- The running totals of the days rolled up so far, from their one-day spans
-- (which hold the late calls folded in so far).
insert into proxy_call_running (day, tenant_id, api_key_id, request_count, spend_micros, spend_cents)
select day, tenant_id, api_key_id, request_count, usage_spend_micros(spend), usage_spend_overflow(spend)
from (
  select
    key_block.first_day + n as day,
    key_block.tenant_id,
    key_block.api_key_id,
    sum(coalesce(span.request_count, 0)) over running as request_count,
    sum(coalesce(span.spend_cents, 0)) over running as spend
  from (
    select tenant_id, api_key_id, usage_span_start(first_day, 32) as block, min(first_day) as first_day
    from proxy_call_spans
    group by 1, 2, 3
  ) as key_block
  cross join usage_rollup_state as state
  cross join lateral generate_series(0, least(key_block.block + 31, state.rolled_until - 1) - key_block.first_day) as n
  left join proxy_call_spans as span
    on span.tenant_id = key_block.tenant_id
    and span.first_day = key_block.first_day + n
    and span.api_key_id = key_block.api_key_id
  where state.singleton
  window running as (partition by key_block.tenant_id, key_block.api_key_id, key_block.block order by n)
) as totals;

-- Built once the rows are in: about half the size of one grown row by row.
alter table proxy_call_running
  add primary key (day, tenant_id, api_key_id) include (request_count, spend_micros, spend_cents);

-- TRUNCATE of proxy_calls empties this rollup with the others (0005).
create or replace function proxy_calls_truncate_rollups() returns trigger
language plpgsql as $$
begin
  delete from proxy_call_daily;
  delete from proxy_call_hourly;
  delete from proxy_call_spans;
  delete from proxy_call_running;
  delete from proxy_call_late;
  return null;
end;
$$;

-- Usage reports (FetchUsageReport) bucket calls by hour or day and group them
-- by key and model. The rollups therefore keep the model, and an hourly one
-- joins the daily one; both hold exactly the closed UTC days in
-- usage_rollup_state's [rolled_from, rolled_until), as before.
--
-- The rollups are rebuilt: the state goes back to "never run", and the job
-- rolls the days up again, one per transaction, on its next runs. Until it
-- has caught up, usage is read from proxy_calls: exact, only slower.
--
-- How writers of proxy_calls and the job are kept apart changes too. The
-- job used to hold the state row locked while it summed a day, and every
-- insert waited for it (today's calls included). Now each statement that
-- writes proxy_calls takes, for each UTC day its rows fall on, a
-- transaction-level advisory lock in shared mode; the job takes the lock of
-- the one day it sums in exclusive mode. Writers never wait for each other,
-- and only a writer of the day being summed (a late call) waits for the job:
-- today's calls never do, since the job only sums days that are over.
-- Whoever takes a day's lock second sees what the first committed: a call
-- committed before the job took the lock is in its sum; a call written after
-- the job committed finds its day rolled up and is added to the rollups
-- here, in its own transaction. Either way once, never twice.

drop trigger proxy_calls_fold_inserts on proxy_calls;
drop trigger proxy_calls_fold_deletes on proxy_calls;
drop function proxy_calls_fold_into_rollup();
drop table proxy_call_daily;

update usage_rollup_state set rolled_from = null, rolled_until = null;

-- model is '' for calls that name none.
create table proxy_call_daily (
  tenant_id uuid not null,
  api_key_id uuid not null,
  -- The UTC day.
  day date not null,
  model text not null,
  request_count bigint not null,
  spend_cents numeric not null,
  primary key (tenant_id, api_key_id, day, model)
);
-- A tenant's keys over a window (a report without key_ids).
create index proxy_call_daily_by_tenant on proxy_call_daily (tenant_id, day)
  include (api_key_id, model, request_count, spend_cents);

create table proxy_call_hourly (
  tenant_id uuid not null,
  api_key_id uuid not null,
  -- The start of the UTC hour.
  hour timestamptz not null,
  model text not null,
  request_count bigint not null,
  spend_cents numeric not null,
  primary key (tenant_id, api_key_id, hour, model)
);
create index proxy_call_hourly_by_tenant on proxy_call_hourly (tenant_id, hour)
  include (api_key_id, model, request_count, spend_cents);

-- The per-key totals of aligned spans of 1, 2, 4, ... 32 days (all models):
-- a span of n days starts on a day whose number (days since 2000-01-01) is
-- a multiple of n. Any run of whole days is a few such spans (at most two
-- of each length), so a tenant's per-key totals over 30 days read about
-- eight rows per key instead of thirty days times the models.
create table proxy_call_spans (
  tenant_id uuid not null,
  span_days int2 not null check (span_days in (1, 2, 4, 8, 16, 32)),
  first_day date not null,
  api_key_id uuid not null,
  request_count bigint not null,
  spend_cents numeric not null,
  primary key (tenant_id, span_days, first_day, api_key_id) include (request_count, spend_cents)
);

-- The first day of the span of `span_days` days that holds `day`.
create function usage_span_start(day date, span_days int) returns date
language sql immutable parallel safe
return day - (((day - date '2000-01-01') % span_days) + span_days) % span_days;

-- Rows folded in by writers update rollup rows in place; keep the visibility
-- map fresh for index-only scans.
alter table proxy_call_daily set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02);
alter table proxy_call_hourly set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02);
alter table proxy_call_spans set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02);

-- A UTC day's advisory lock: the two-key form, an arbitrary first key and
-- the day as days since 2000-01-01 (every date PostgreSQL can hold fits).
create function usage_day_lock_key(day date) returns int4
language sql immutable parallel safe
return day - date '2000-01-01';

-- The lock that stands for every day: the one number no date gives.
create function usage_all_days_lock_key() returns int4
language sql immutable parallel safe
return -2147483648;

-- Adds `sign` times `calls` to the rollups, those on rolled-up days.
--
-- Only a day the job may still roll up (from rolled_until on) needs its
-- lock: the job never sums a day twice, so calls of rolled-up days are
-- simply folded in. A writer at READ COMMITTED (the default) reads the
-- state, takes the shared lock of each such day its calls fall on, then
-- reads the state again: each statement here sees what committed before it,
-- so it sees the job's last day. Calls of many such days (more than 16), or
-- of days after tomorrow (which the job cannot sum while this transaction
-- runs unless it stays open for a day), take one shared lock that covers
-- every day instead, so that no statement holds more than a few locks (the
-- lock table is shared by the whole server).
--
-- A writer whose snapshot is older than its statement (REPEATABLE READ,
-- SERIALIZABLE) could read a state the job has since moved. It locks the
-- state row instead, which the job updates: PostgreSQL fails such a writer
-- if the job moved the row after its snapshot was taken (it is retried by
-- its client, never miscounted), and makes it wait while the job sums a day.
--
-- The job only ever tries these locks (src/jobs/rollup.ts): it waits for no
-- writer, so a writer's transaction and the job cannot deadlock.
create function usage_rollups_add(calls proxy_calls[], sign int) returns void
language plpgsql as $$
declare
  state usage_rollup_state;
  open_days date[];
begin
  if current_setting('transaction_isolation') <> 'read committed' then
    select * into state from usage_rollup_state where singleton for share;
  else
    select * into state from usage_rollup_state where singleton;
    select array_agg(day order by day) into open_days
    from (
      select distinct (c.created_at at time zone 'UTC')::date as day
      from unnest(calls) as c
    ) as days
    where state.rolled_until is null or day >= state.rolled_until;
    if open_days is not null then
      if cardinality(open_days) > 16
         or open_days[cardinality(open_days)] > (clock_timestamp() at time zone 'UTC')::date + 1 then
        perform pg_advisory_xact_lock_shared(7301944, usage_all_days_lock_key());
      else
        perform pg_advisory_xact_lock_shared(7301944, usage_day_lock_key(day)) from unnest(open_days) as day;
      end if;
      select * into state from usage_rollup_state where singleton;
    end if;
  end if;
  if state.rolled_from is null then
    return;
  end if;
  with rolled as (
    select c.tenant_id, c.api_key_id, c.created_at, coalesce(c.model, '') as model, c.cost_cents
    from unnest(calls) as c
    where c.created_at >= state.rolled_from::timestamp at time zone 'UTC'
      and c.created_at < state.rolled_until::timestamp at time zone 'UTC'
  ),
  daily as (
    insert into proxy_call_daily as d (tenant_id, api_key_id, day, model, request_count, spend_cents)
    select tenant_id, api_key_id, (created_at at time zone 'UTC')::date, model, sign * count(*), sign * sum(cost_cents)
    from rolled
    group by 1, 2, 3, 4
    on conflict (tenant_id, api_key_id, day, model) do update
      set request_count = d.request_count + excluded.request_count,
          spend_cents = d.spend_cents + excluded.spend_cents
  ),
  spans as (
    insert into proxy_call_spans as s (tenant_id, span_days, first_day, api_key_id, request_count, spend_cents)
    select tenant_id, span.days, usage_span_start((created_at at time zone 'UTC')::date, span.days), api_key_id,
           sign * count(*), sign * sum(cost_cents)
    from rolled
    cross join (values (1), (2), (4), (8), (16), (32)) as span (days)
    group by 1, 2, 3, 4
    on conflict (tenant_id, span_days, first_day, api_key_id) do update
      set request_count = s.request_count + excluded.request_count,
          spend_cents = s.spend_cents + excluded.spend_cents
  )
  insert into proxy_call_hourly as h (tenant_id, api_key_id, hour, model, request_count, spend_cents)
  select tenant_id, api_key_id, date_trunc('hour', created_at, 'UTC'), model, sign * count(*), sign * sum(cost_cents)
  from rolled
  group by 1, 2, 3, 4
  on conflict (tenant_id, api_key_id, hour, model) do update
    set request_count = h.request_count + excluded.request_count,
        spend_cents = h.spend_cents + excluded.spend_cents;
end;
$$;

-- After every statement that writes proxy_calls. An UPDATE counts as its old
-- rows deleted and its new rows inserted (two triggers, in name order), so
-- changing a call's cost, time, key or model keeps usage exact.
create function proxy_calls_fold_inserted() returns trigger
language plpgsql as $$
begin
  perform usage_rollups_add(array(select n::proxy_calls from new_rows as n), 1);
  return null;
end;
$$;

create function proxy_calls_fold_deleted() returns trigger
language plpgsql as $$
begin
  perform usage_rollups_add(array(select o::proxy_calls from old_rows as o), -1);
  return null;
end;
$$;

create trigger proxy_calls_fold_inserts
  after insert on proxy_calls
  referencing new table as new_rows
  for each statement execute function proxy_calls_fold_inserted();

create trigger proxy_calls_fold_updates_1_old
  after update on proxy_calls
  referencing old table as old_rows
  for each statement execute function proxy_calls_fold_deleted();

create trigger proxy_calls_fold_updates_2_new
  after update on proxy_calls
  referencing new table as new_rows
  for each statement execute function proxy_calls_fold_inserted();

create trigger proxy_calls_fold_deletes
  after delete on proxy_calls
  referencing old table as old_rows
  for each statement execute function proxy_calls_fold_deleted();

-- TRUNCATE deletes every call without row triggers: the rollups are emptied
-- with it (every rolled-up day then rightly sums to nothing). TRUNCATE holds
-- proxy_calls exclusively, so no writer or job runs meanwhile.
create function proxy_calls_truncate_rollups() returns trigger
language plpgsql as $$
begin
  delete from proxy_call_daily;
  delete from proxy_call_hourly;
  delete from proxy_call_spans;
  return null;
end;
$$;

create trigger proxy_calls_truncate_rollups
  before truncate on proxy_calls
  for each statement execute function proxy_calls_truncate_rollups();

-- Usage reports (FetchUsageReport) bucket calls by hour or day and group them
-- by key and model, and sum a tenant's keys over long windows. The job now
-- rolls closed UTC days up into three tables: hourly and daily per key and
-- model, and per key over aligned spans of days. They hold exactly the days
-- in usage_rollup_state's [rolled_from, rolled_until), as before, together
-- with proxy_call_late: the calls written since for those days.
--
-- The rollups are rebuilt: the state goes back to "never run", and the job
-- rolls the days up again, one per transaction, on its next runs. Until it
-- has caught up, usage is read from proxy_calls: exact, only slower.
--
-- Writers of proxy_calls only ever append. A call of a day already rolled up
-- (a late call; or one updated or deleted, as its row out and its row in)
-- adds a row to proxy_call_late in the writer's transaction, which the job
-- folds into the rollups later. Writers thus never lock a rollup row: they
-- never wait for each other there, and never for the job.
--
-- The writers and the job meet on one thing: a day the job may be rolling up
-- right now. Each writing statement takes, for each such day its calls fall
-- on, a transaction-level advisory lock in shared mode; the job tries the
-- lock of the day it sums in exclusive mode, and leaves the day for a moment
-- later while a writer of it is under way. Whoever gets the lock second sees
-- what the first committed: a call committed before the job took the lock is
-- in its sum; one written after the job committed finds its day rolled up
-- and goes to proxy_call_late. Either way once, never twice.

drop trigger proxy_calls_fold_inserts on proxy_calls;
drop trigger proxy_calls_fold_deletes on proxy_calls;
drop function proxy_calls_fold_into_rollup();
drop table proxy_call_daily;

update usage_rollup_state set rolled_from = null, rolled_until = null;

-- A model's key in the rollups: a hash, so that a model name of any length
-- (B-tree entries are limited to about 2.7 kB) can be rolled up. model is
-- '' for calls that name none.
create function usage_model_key(model text) returns uuid
language sql immutable parallel safe
return md5(coalesce(model, ''))::uuid;

create table proxy_call_daily (
  tenant_id uuid not null,
  api_key_id uuid not null,
  -- The UTC day.
  day date not null,
  model_key uuid not null,
  model text not null,
  request_count bigint not null,
  spend_cents numeric not null,
  primary key (tenant_id, api_key_id, day, model_key)
);
-- A tenant's keys over a window (a report without key_ids).
create index proxy_call_daily_by_tenant on proxy_call_daily (tenant_id, day);

create table proxy_call_hourly (
  tenant_id uuid not null,
  api_key_id uuid not null,
  -- The start of the UTC hour.
  hour timestamptz not null,
  model_key uuid not null,
  model text not null,
  request_count bigint not null,
  spend_cents numeric not null,
  primary key (tenant_id, api_key_id, hour, model_key)
);
create index proxy_call_hourly_by_tenant on proxy_call_hourly (tenant_id, hour);

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

-- Calls written for rolled-up days since they were rolled up, per key, UTC
-- hour and model, added (or, for a call deleted, subtracted) by the writers;
-- the job moves them into the rollups. Only appended to by writers.
create table proxy_call_late (
  tenant_id uuid not null,
  api_key_id uuid not null,
  hour timestamptz not null,
  model text not null,
  request_count bigint not null,
  spend_cents numeric not null
);
create index proxy_call_late_by_tenant on proxy_call_late (tenant_id, hour);

-- The first day of the span of `span_days` days that holds `day`.
create function usage_span_start(day date, span_days int) returns date
language sql immutable parallel safe
return day - (((day - date '2000-01-01') % span_days) + span_days) % span_days;

-- The rollups are updated in place by the job; keep their visibility maps
-- fresh for index-only scans.
alter table proxy_call_daily set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02);
alter table proxy_call_hourly set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02);
alter table proxy_call_spans set (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.02);

-- A UTC day's advisory lock: the two-key form, an arbitrary first key and
-- the day as days since 2000-01-01 (every finite date PostgreSQL can hold
-- fits in an int4).
create function usage_day_lock_key(day date) returns int4
language sql immutable parallel safe
return day - date '2000-01-01';

-- The lock that stands for every day: a number no date gives.
create function usage_all_days_lock_key() returns int4
language sql immutable parallel safe
return -2147483648;

-- Locks `days` (distinct, in order) against the job summing one of them
-- now, and returns the state as it is once they are locked.
--
-- A writer at READ COMMITTED (the default) takes the shared lock of each day,
-- then reads the state: each statement here sees what committed before it,
-- so it sees the job's last day. (Only a day from rolled_until on needs its
-- lock, since the job never sums a day twice; locking every day spares the
-- common writer a first read of the state.) More than 16 days in one
-- transaction, a day after tomorrow (which the job cannot sum while this
-- transaction runs unless it stays open for a day), or one that is not
-- finite, take one shared lock that stands for every day instead: no
-- transaction holds more than a few locks (the lock table is shared by the
-- whole server).
--
-- A writer whose snapshot is older than its statement (REPEATABLE READ,
-- SERIALIZABLE) could read a state the job has since moved. It locks the
-- state row instead, which the job updates: PostgreSQL fails such a writer
-- if the job moved the row after its snapshot was taken (it is retried by
-- its client, never miscounted).
--
-- The job only tries these locks (src/jobs/rollup.ts), and writers lock no
-- row the job writes: a writer and the job never deadlock.
create function usage_lock_days(days date[]) returns usage_rollup_state
language plpgsql as $$
declare
  state usage_rollup_state;
  held_days int;
begin
  if coalesce(cardinality(days), 0) = 0 then
    return null;
  end if;
  if current_setting('transaction_isolation') <> 'read committed' then
    select * into state from usage_rollup_state where singleton for share;
    return state;
  end if;
  -- The locks this transaction took before last until it ends: the
  -- all-days lock covers every day, and day locks are counted.
  if current_setting('keys.usage_all_days_lock', true) is distinct from 'held' then
    held_days := coalesce(nullif(current_setting('keys.usage_day_locks', true), ''), '0')::int;
    if held_days + cardinality(days) > 16
       or not isfinite(days[1])
       or days[cardinality(days)] > (clock_timestamp() at time zone 'UTC')::date + 1 then
      perform pg_advisory_xact_lock_shared(7301944, usage_all_days_lock_key());
      perform set_config('keys.usage_all_days_lock', 'held', true);
    else
      perform pg_advisory_xact_lock_shared(7301944, usage_day_lock_key(day)) from unnest(days) as day;
      perform set_config('keys.usage_day_locks', (held_days + cardinality(days))::text, true);
    end if;
  end if;
  select * into state from usage_rollup_state where singleton;
  return state;
end;
$$;

-- After every statement that writes proxy_calls: its calls of rolled-up days
-- go to proxy_call_late, added for rows in and subtracted for rows out. An
-- UPDATE is both (two triggers, in name order), so changing a call's cost,
-- time, key or model keeps usage exact. Two functions that differ only in
-- the transition table they read and the sign: a trigger function cannot be
-- handed a transition table, and copying its rows into an array to share
-- one body failed statements of more than 1 GB (docs/DESIGN.md).
create function proxy_calls_note_inserted() returns trigger
language plpgsql as $$
declare
  days date[] := array(select distinct (created_at at time zone 'UTC')::date from new_rows order by 1);
  state usage_rollup_state := usage_lock_days(days);
begin
  -- Only when a call falls on a rolled-up day (not today's, the usual case).
  if days[1] < state.rolled_until and days[cardinality(days)] >= state.rolled_from then
    insert into proxy_call_late (tenant_id, api_key_id, hour, model, request_count, spend_cents)
    select tenant_id, api_key_id, date_trunc('hour', created_at, 'UTC'), coalesce(model, ''), count(*), sum(cost_cents)
    from new_rows
    where created_at >= state.rolled_from::timestamp at time zone 'UTC'
      and created_at < state.rolled_until::timestamp at time zone 'UTC'
    group by 1, 2, 3, 4;
  end if;
  return null;
end;
$$;

create function proxy_calls_note_deleted() returns trigger
language plpgsql as $$
declare
  days date[] := array(select distinct (created_at at time zone 'UTC')::date from old_rows order by 1);
  state usage_rollup_state := usage_lock_days(days);
begin
  -- Only when a call falls on a rolled-up day (not today's, the usual case).
  if days[1] < state.rolled_until and days[cardinality(days)] >= state.rolled_from then
    insert into proxy_call_late (tenant_id, api_key_id, hour, model, request_count, spend_cents)
    select tenant_id, api_key_id, date_trunc('hour', created_at, 'UTC'), coalesce(model, ''), -count(*), -sum(cost_cents)
    from old_rows
    where created_at >= state.rolled_from::timestamp at time zone 'UTC'
      and created_at < state.rolled_until::timestamp at time zone 'UTC'
    group by 1, 2, 3, 4;
  end if;
  return null;
end;
$$;

create trigger proxy_calls_note_inserts
  after insert on proxy_calls
  referencing new table as new_rows
  for each statement execute function proxy_calls_note_inserted();

create trigger proxy_calls_note_updates_1_old
  after update on proxy_calls
  referencing old table as old_rows
  for each statement execute function proxy_calls_note_deleted();

create trigger proxy_calls_note_updates_2_new
  after update on proxy_calls
  referencing new table as new_rows
  for each statement execute function proxy_calls_note_inserted();

create trigger proxy_calls_note_deletes
  after delete on proxy_calls
  referencing old table as old_rows
  for each statement execute function proxy_calls_note_deleted();

-- TRUNCATE deletes every call without row triggers: the rollups are emptied
-- with it (every rolled-up day then rightly sums to nothing). TRUNCATE holds
-- proxy_calls exclusively, so no writer or job runs meanwhile (the job locks
-- proxy_calls whenever it writes the rollups, src/jobs/rollup.ts).
create function proxy_calls_truncate_rollups() returns trigger
language plpgsql as $$
begin
  delete from proxy_call_daily;
  delete from proxy_call_hourly;
  delete from proxy_call_spans;
  delete from proxy_call_late;
  return null;
end;
$$;

create trigger proxy_calls_truncate_rollups
  before truncate on proxy_calls
  for each statement execute function proxy_calls_truncate_rollups();

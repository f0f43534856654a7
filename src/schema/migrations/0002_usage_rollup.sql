-- A daily per-key rollup of proxy_calls, so that FetchKeyUsage costs the same
-- for a 90-day window as for a 1-day one: whole days come from the rollup,
-- the partial days at the window's edges from proxy_calls.
--
-- proxy_calls is an append-only log: rows are inserted (late ones too) and
-- deleted (retention), never updated.

create table proxy_call_daily (
  tenant_id uuid not null,
  api_key_id uuid not null,
  -- The UTC day.
  day date not null,
  request_count bigint not null,
  spend_cents numeric not null,
  primary key (tenant_id, api_key_id, day)
);

-- Which days the rollup holds: every UTC day in [rolled_from, rolled_until).
-- Null until the job's first run.
create table usage_rollup_state (
  singleton boolean primary key default true check (singleton),
  rolled_from date,
  rolled_until date,
  check ((rolled_from is null) = (rolled_until is null) and rolled_from <= rolled_until)
);
insert into usage_rollup_state (singleton) values (true);

-- Rows inserted or deleted for a day the rollup already holds are applied to
-- it in the same transaction. The share lock on the state row orders this
-- against the rollup job, which holds the row exclusively while it rolls up
-- a day and moves rolled_until: a row is either seen by the job's sum or
-- folded in here, never both, never neither.
create function proxy_calls_fold_into_rollup() returns trigger
language plpgsql as $$
declare
  state usage_rollup_state;
  sign int := case when tg_op = 'DELETE' then -1 else 1 end;
begin
  select * into state from usage_rollup_state where singleton for share;
  if state.rolled_from is null then
    return null;
  end if;
  insert into proxy_call_daily as d (tenant_id, api_key_id, day, request_count, spend_cents)
  select tenant_id, api_key_id, (created_at at time zone 'UTC')::date, sign * count(*), sign * sum(cost_cents)
  from changed_rows
  where created_at >= state.rolled_from::timestamp at time zone 'UTC'
    and created_at < state.rolled_until::timestamp at time zone 'UTC'
  group by 1, 2, 3
  on conflict (tenant_id, api_key_id, day) do update
    set request_count = d.request_count + excluded.request_count,
        spend_cents = d.spend_cents + excluded.spend_cents;
  return null;
end;
$$;

create trigger proxy_calls_fold_inserts
  after insert on proxy_calls
  referencing new table as changed_rows
  for each statement execute function proxy_calls_fold_into_rollup();

create trigger proxy_calls_fold_deletes
  after delete on proxy_calls
  referencing old table as changed_rows
  for each statement execute function proxy_calls_fold_into_rollup();

-- The job sums one whole day of every key at a time; a BRIN index keeps that
-- cheap on a log written in time order, at a tiny fraction of a b-tree's size.
create index proxy_calls_created_brin on proxy_calls using brin (created_at);

-- Index-only scans need a fresh visibility map; an insert-mostly log would
-- otherwise wait for the default thresholds (20% of the table) to be vacuumed.
alter table proxy_calls set (
  autovacuum_vacuum_insert_scale_factor = 0.01,
  autovacuum_vacuum_insert_threshold = 10000,
  autovacuum_vacuum_scale_factor = 0.01,
  autovacuum_analyze_scale_factor = 0.02
);

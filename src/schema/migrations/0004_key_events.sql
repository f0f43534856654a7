-- Key changes as events: the feed WatchKeys serves and the audit trail
-- ListKeyChanges pages through. Captured here, in the database, in the same
-- transaction as the change, whoever makes it: this service, another one, or
-- an operator's SQL.

-- Only changes of a key's state count. The proxy's usage counters
-- (total_requests, last_used_at) change on every proxied call; they neither
-- move the version (so an etag stays valid while the key is in use) nor make
-- events. Everything else is compared, so a column added later counts
-- without touching this function.
create or replace function api_keys_bump_version() returns trigger
language plpgsql as $$
declare
  before_change api_keys := old;
  after_change api_keys := new;
begin
  before_change.total_requests := 0;
  after_change.total_requests := 0;
  before_change.last_used_at := null;
  after_change.last_used_at := null;
  before_change.updated_at := null;
  after_change.updated_at := null;
  before_change.version := 0;
  after_change.version := 0;
  if after_change is distinct from before_change then
    new.version := old.version + 1;
    new.updated_at := now();
  else
    new.version := old.version;
    new.updated_at := old.updated_at;
  end if;
  return new;
end;
$$;

create sequence key_events_position as bigint;

-- One row per change of one key, each key's in commit order (see api_keys_record_event).
create table key_events (
  -- The change's place in the feed, taken as its transaction commits, from 1.
  position bigint primary key,
  tenant_id uuid not null,
  key_id uuid not null,
  kind text not null check (kind in ('created', 'updated', 'frozen', 'unfrozen', 'deleted')),
  -- When the change committed (to within the commit itself).
  changed_at timestamptz not null,
  -- Why and by whom: the freeze's or unfreeze's own, else what the writer
  -- set in keys.change_reason / keys.change_actor, else null.
  reason text,
  actor text,
  -- Who wrote it, as the database knows: the role and application_name.
  db_role text not null,
  application text not null,
  -- The key after the change (before it, for a deletion); never the hash.
  name text not null,
  key_prefix text not null,
  status text not null,
  is_frozen boolean not null,
  frozen_at timestamptz,
  freeze_reason text,
  freeze_actor text,
  created_at timestamptz not null,
  last_used_at timestamptz,
  expires_at timestamptz,
  total_requests bigint not null,
  version bigint not null
);

-- A tenant's feed, and one key's history (ListKeyChanges, newest first).
create index key_events_by_tenant on key_events (tenant_id, position);
create index key_events_by_key on key_events (tenant_id, key_id, position);
-- Retention deletes by age; positions grow with time.
create index key_events_changed_at on key_events using brin (changed_at);

-- Retention: events up to pruned_through (inclusive) have been deleted, so a
-- cursor before it cannot be resumed from.
create table key_events_retention (
  singleton boolean primary key default true check (singleton),
  pruned_through bigint not null default 0
);
insert into key_events_retention (singleton) values (true);

-- Records one change as an event. Runs as a deferred trigger, that is while
-- the transaction commits, so a position is taken at commit, not when the
-- row changed; a transaction that stays open holds no position.
--
-- Before taking its position, the transaction takes a shared lock that it
-- keeps until it has committed or aborted. Writers do not wait for each
-- other on it; a reader that finds a position missing below ones it can see
-- (taken by a commit still under way, or by one that failed) takes the lock
-- exclusively for a moment, which waits until every position taken so far
-- is committed or abandoned: what is still missing then never comes. So a
-- reader never moves its cursor past a position that may still appear
-- (src/feed/key-feed.ts).
--
-- The readers are woken with NOTIFY. PostgreSQL serialises the commits of
-- transactions that notify, so this service, which writes most changes,
-- notifies in a statement of its own after its write instead, and the
-- trigger notifies for every other writer (a console, an operator's SQL).
create function key_events_record(k api_keys, event_kind text, event_reason text, event_actor text)
returns void
language plpgsql as $$
begin
  perform pg_advisory_xact_lock_shared(7301944514);
  insert into key_events (
    position, tenant_id, key_id, kind, changed_at, reason, actor, db_role, application,
    name, key_prefix, status, is_frozen, frozen_at, freeze_reason, freeze_actor,
    created_at, last_used_at, expires_at, total_requests, version
  )
  values (
    nextval('key_events_position'), k.tenant_id, k.id, event_kind, clock_timestamp(),
    coalesce(event_reason, nullif(current_setting('keys.change_reason', true), '')),
    coalesce(event_actor, nullif(current_setting('keys.change_actor', true), '')),
    current_user, current_setting('application_name'),
    k.name, k.key_prefix, k.status, k.is_frozen, k.frozen_at,
    case when k.is_frozen then k.freeze_reason end, case when k.is_frozen then k.freeze_actor end,
    k.created_at, k.last_used_at, k.expires_at, k.total_requests, k.version
  );
  -- A wake-up for the feed's readers; the table is the truth. Notifications
  -- with the same payload in one transaction are delivered once.
  if current_setting('application_name') <> 'keys-driver-service' then
    perform pg_notify('key_events', '');
  end if;
end;
$$;

create function api_keys_record_event() returns trigger
language plpgsql as $$
begin
  if tg_op = 'DELETE' then
    perform key_events_record(old, 'deleted', null, null);
  elsif tg_op = 'INSERT' then
    perform key_events_record(new, 'created', null, null);
  elsif (new.tenant_id, new.id) is distinct from (old.tenant_id, old.id) then
    -- Moved to another tenant or given another id: for watchers, the old
    -- key is gone and a new one has appeared.
    perform key_events_record(old, 'deleted', null, null);
    perform key_events_record(new, 'created', null, null);
  elsif new.is_frozen and not old.is_frozen then
    perform key_events_record(new, 'frozen', new.freeze_reason, new.freeze_actor);
  elsif old.is_frozen and not new.is_frozen then
    perform key_events_record(new, 'unfrozen', new.unfreeze_reason, new.unfreeze_actor);
  else
    perform key_events_record(new, 'updated', null, null);
  end if;
  return null;
end;
$$;

-- TRUNCATE deletes every key without row triggers: each is recorded as
-- deleted first. Not deferred (no such trigger for TRUNCATE), so the
-- positions are taken now and held until the transaction ends.
create function api_keys_record_truncate() returns trigger
language plpgsql as $$
declare
  k api_keys;
begin
  for k in select * from api_keys loop
    perform key_events_record(k, 'deleted', null, null);
  end loop;
  return null;
end;
$$;

create trigger api_keys_record_truncate
  before truncate on api_keys
  for each statement execute function api_keys_record_truncate();

create constraint trigger api_keys_record_insert
  after insert on api_keys
  deferrable initially deferred
  for each row execute function api_keys_record_event();

create constraint trigger api_keys_record_update
  after update on api_keys
  deferrable initially deferred
  for each row when (old.version is distinct from new.version)
  execute function api_keys_record_event();

create constraint trigger api_keys_record_delete
  after delete on api_keys
  deferrable initially deferred
  for each row execute function api_keys_record_event();

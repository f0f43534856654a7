-- The feed's reader settles a position missing below visible ones without
-- the position lock: it waits until every transaction running when it
-- noticed the gap has ended (src/db/events.ts, runningTransactions). That
-- needs every holder of a position to have a transaction id before it takes
-- the position, which a row change gives it, and a TRUNCATE's deletions
-- (recorded before the table is touched) did not; the function now takes
-- one first. The position sequence must keep handing out values in order
-- (no per-session cache).

create or replace function key_events_record(k api_keys, event_kind text, event_reason text, event_actor text)
returns void
language plpgsql as $$
begin
  perform pg_advisory_xact_lock_shared(7301944514);
  -- The transaction's id before its position (a TRUNCATE may have none yet).
  perform pg_current_xact_id();
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

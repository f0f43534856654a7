-- The role the service acts as (DATABASE_ROLE, by default this one): what
-- the rpcs, the feed and the background jobs need, and nothing more. No DDL
-- (it owns nothing and may create nothing), and no right to read
-- api_keys.key_hash at all: "the hash never leaves the database" is
-- PostgreSQL's rule, not only the code's. Migrations run as the owner.
--
-- A later migration that adds a table the service uses grants this role
-- what it needs there, as this one does.

-- Roles belong to the whole server: another database's migration, or a
-- superuser, may have made it already (PostgreSQL checks the right to create
-- a role before it checks the name, so the lookup comes first).
do $$
begin
  if exists (select from pg_roles where rolname = 'keys_driver_service') then
    return;
  end if;
  create role keys_driver_service nologin;
exception
  -- A concurrent migration made it first.
  when duplicate_object or unique_violation then null;
  when insufficient_privilege then
    raise exception 'the role keys_driver_service does not exist and % may not create it',
      current_user
      using hint = 'as a superuser, run: create role keys_driver_service nologin; then run the migration again';
end
$$;

do $$
begin
  if not has_schema_privilege('keys_driver_service', current_schema(), 'usage') then
    execute format('grant usage on schema %I to keys_driver_service', current_schema());
  end if;
end
$$;

-- Nothing here lets it create objects in the schema. (Like every role, it
-- may make temporary tables of its own session, PostgreSQL's default for
-- PUBLIC, which touch no one else's data.)

-- Keys: every column but the hash is read; only the kill switch's columns
-- are written (the version trigger bumps version itself). A row lock
-- (FetchKeyForUpdate, a freeze) needs an updatable column, which these are.
grant select (
  tenant_id, id, name, key_prefix, status, permissions, rate_limit_per_minute,
  rate_limit_per_day, is_frozen, frozen_at, freeze_reason, freeze_actor,
  unfrozen_at, unfreeze_reason, unfreeze_actor, revoked_at, revoked_reason,
  created_at, updated_at, last_used_at, expires_at, total_requests, version
) on api_keys to keys_driver_service;
grant update (
  is_frozen, frozen_at, freeze_reason, freeze_actor, unfrozen_at,
  unfreeze_reason, unfreeze_actor
) on api_keys to keys_driver_service;

-- The change feed and audit trail: written by the triggers of a freeze
-- (which run as the writer), read by WatchKeys and ListKeyChanges, pruned by
-- the retention job.
grant select, insert, delete on key_events to keys_driver_service;
grant usage, select on sequence key_events_position to keys_driver_service;
grant select, update on key_events_retention to keys_driver_service;

-- Usage: the proxy's log is read, never written; the rollups are the
-- rollup job's to write.
grant select on proxy_calls to keys_driver_service;
grant select, insert, update, delete on
  proxy_call_daily, proxy_call_hourly, proxy_call_spans, proxy_call_running,
  proxy_call_late
to keys_driver_service;
grant select, update on usage_rollup_state to keys_driver_service;

-- The page-token secret, and the schema check at start.
grant select on service_secrets, schema_migrations to keys_driver_service;

-- The rollup job VACUUMs what it wrote; PostgreSQL 17 can grant that alone
-- (MAINTAIN). Before 17 only the owner may, and autovacuum does it.
do $$
begin
  if current_setting('server_version_num')::int >= 170000 then
    execute 'grant maintain on proxy_call_daily, proxy_call_hourly, proxy_call_spans, proxy_call_running to keys_driver_service';
  end if;
end
$$;

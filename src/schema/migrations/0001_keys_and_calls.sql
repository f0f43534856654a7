-- API keys and the proxy's call log.
--
-- Every table is keyed by tenant_id first: every statement the service runs
-- filters by it, and a distributed PostgreSQL can shard on it.

create table api_keys (
  tenant_id uuid not null,
  id uuid not null,
  name text not null default '',
  key_prefix text not null,
  -- The secret's hash; it never leaves the database.
  key_hash bytea not null,
  status text not null default 'active'
    check (status in ('active', 'revoked', 'expired')),
  permissions text[] not null default '{}',
  rate_limit_per_minute integer check (rate_limit_per_minute > 0),
  rate_limit_per_day integer check (rate_limit_per_day > 0),
  is_frozen boolean not null default false,
  frozen_at timestamptz,
  freeze_reason text,
  freeze_actor text,
  unfrozen_at timestamptz,
  unfreeze_reason text,
  unfreeze_actor text,
  revoked_at timestamptz,
  revoked_reason text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  last_used_at timestamptz,
  expires_at timestamptz,
  total_requests bigint not null default 0 check (total_requests >= 0),
  -- Bumped by a trigger on every change; the etag is derived from it.
  version bigint not null default 1,
  primary key (tenant_id, id),
  -- The kill switch's two columns can never disagree, whatever writes them.
  constraint api_keys_frozen_at_iff_frozen check (is_frozen = (frozen_at is not null))
);

-- Serves FetchKeys' order and keyset, and CountKeys as an index-only scan.
create index api_keys_tenant_newest on api_keys (tenant_id, created_at desc, id desc);

-- Every real change of a row (by this service or anyone else) gets a new
-- version, so an etag taken before it is stale. A write that changes nothing
-- keeps the version.
create function api_keys_bump_version() returns trigger
language plpgsql as $$
begin
  if new is distinct from old then
    new.version := old.version + 1;
    new.updated_at := now();
  end if;
  return new;
end;
$$;

create trigger api_keys_bump_version
  before update on api_keys
  for each row execute function api_keys_bump_version();

create table proxy_calls (
  tenant_id uuid not null,
  id uuid not null default gen_random_uuid(),
  api_key_id uuid not null,
  created_at timestamptz not null default now(),
  -- Cost in cents, fractional cents kept (e.g. 0.0125 for a cheap call).
  cost_cents numeric(20, 6) not null default 0 check (cost_cents >= 0),
  method text not null default 'POST',
  endpoint text not null default '',
  model text,
  prompt_tokens integer,
  completion_tokens integer,
  status_code smallint,
  latency_ms integer,
  primary key (tenant_id, id)
);

-- Serves FetchKeyUsage: one key's calls in a window, with the cost in the
-- index so the sum is an index-only scan.
create index proxy_calls_key_time on proxy_calls (tenant_id, api_key_id, created_at)
  include (cost_cents);

-- Secrets the service generates for itself and shares between replicas
-- through the database (e.g. the key that signs page tokens).
create table service_secrets (
  name text primary key,
  value bytea not null check (length(value) >= 32),
  created_at timestamptz not null default now()
);

-- gen_random_uuid() draws from the server's strong random source; two of them
-- give 244 random bits.
insert into service_secrets (name, value)
values ('page_token', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));

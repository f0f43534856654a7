import { type CoalescedTask, coalesced } from "../coalesce.js";
import type { Micros } from "../micros.js";
import { type Sql, unscopedSql } from "./client.js";
import { timestampAt } from "./time.js";

/** The status values the api_keys.status column allows. */
export type KeyStatus = "active" | "revoked" | "expired";

/** The columns of api_keys the service may show, timestamps in micros. */
export interface KeyRow {
  readonly id: string;
  readonly tenant_id: string;
  readonly name: string;
  readonly key_prefix: string;
  readonly status: KeyStatus;
  readonly is_frozen: boolean;
  readonly frozen_at_us: Micros | null;
  /** The current freeze's reason and actor; null when not frozen. */
  readonly freeze_reason: string | null;
  readonly freeze_actor: string | null;
  readonly created_at_us: Micros;
  readonly last_used_at_us: Micros | null;
  readonly expires_at_us: Micros | null;
  readonly total_requests: bigint;
  readonly version: bigint;
}

/** A position in the newest-first order: the last key of a page. */
export interface KeyCursor {
  readonly createdAtUs: Micros;
  readonly id: string;
}

/** What a freeze or unfreeze was asked to do. */
export interface FreezeChange {
  readonly tenantId: string;
  readonly keyId: string;
  /** Apply only if the key is still at this version. */
  readonly expectedVersion?: bigint;
  readonly reason: string | null;
  readonly actor: string | null;
}

/** How a conditional freeze or unfreeze ended. */
export type FreezeOutcome =
  | { readonly kind: "not_found" }
  | { readonly kind: "stale" }
  /** A freeze's frozen_at before the key was created: nothing written. */
  | { readonly kind: "frozen_before_creation" }
  | { readonly kind: "done"; readonly key: KeyRow; readonly changed: boolean };

/**
 * The columns a KeyRow is made of, from api_keys; never the hash. Instants
 * leave as microseconds since the epoch (epoch_micros, migration 0003).
 */
export function keyColumns(sql: Sql) {
  return sql`
    id,
    tenant_id,
    name,
    key_prefix,
    status,
    is_frozen,
    epoch_micros(frozen_at) as frozen_at_us,
    case when is_frozen then freeze_reason end as freeze_reason,
    case when is_frozen then freeze_actor end as freeze_actor,
    epoch_micros(created_at) as created_at_us,
    epoch_micros(last_used_at) as last_used_at_us,
    epoch_micros(expires_at) as expires_at_us,
    total_requests,
    version
  `;
}

/** One key of a tenant, or undefined. */
export async function fetchKeyById(sql: Sql, tenantId: string, keyId: string): Promise<KeyRow | undefined> {
  const [row]: [KeyRow?] = await sql`
    select ${keyColumns(sql)}
    from api_keys
    where tenant_id = ${tenantId}
      and id = ${keyId}
  `;
  return row;
}

/**
 * A page of a tenant's keys, newest first (created_at desc, id desc), after
 * `cursor` when given, skipping `skip` keys, at most `limit` keys.
 */
export async function fetchKeys(
  sql: Sql,
  tenantId: string,
  options: { readonly cursor?: KeyCursor; readonly skip: number; readonly limit: number },
): Promise<KeyRow[]> {
  const { cursor, skip, limit } = options;
  const after = cursor
    ? sql`and (created_at, id) < (${timestampAt(sql, cursor.createdAtUs)}, ${cursor.id}::uuid)`
    : sql``;
  return await sql<KeyRow[]>`
    select ${keyColumns(sql)}
    from api_keys
    where tenant_id = ${tenantId}
      ${after}
    order by created_at desc, id desc
    limit ${limit}
    offset ${skip}
  `;
}

/**
 * One key of a tenant, for a conditional update: today the same statement as
 * fetchKeyById; a separate name so that a store sending reads to a replica
 * keeps this one on the primary (docs/SCALING.md).
 */
export const fetchKeyForUpdate = fetchKeyById;

/** Number of keys a tenant has. */
export async function countKeys(sql: Sql, tenantId: string): Promise<bigint> {
  const [row]: [{ count: bigint }?] = await sql`
    select count(*) as count
    from api_keys
    where tenant_id = ${tenantId}
  `;
  return row?.count ?? 0n;
}

/**
 * How often, at most, one process wakes the feed's readers: a change
 * committed after a quiet spell wakes them at once, the changes of a burst
 * share one wake-up per interval. Each wake-up is a statement here and a
 * read of key_events in every listening process, so under a stream of
 * freezes this bounds that work instead of adding it to every freeze; it
 * delays an event by at most this much.
 */
export const wakeUpIntervalMs = 5;

/** Per pool, its wake-ups (see wakeFeedReaders). */
const wakeUps = new WeakMap<Sql, CoalescedTask>();

/**
 * Wakes the feed's readers in every process (LISTEN key_events) after a
 * change this service committed, without making the caller wait.
 *
 * In a statement of its own: PostgreSQL serialises the commits of
 * transactions that notify, and the change's own commit should not wait on
 * others' (migration 0004). Coalesced (wakeUpIntervalMs), and every change
 * is followed by a notification sent after its commit. The wake-up's own
 * commit need not be durable (synchronous_commit off): a lost one is made
 * good by the feed's slow poll, as is a failed one.
 */
function wakeFeedReaders(sql: Sql): void {
  const pool = unscopedSql(sql);
  let wakeUp = wakeUps.get(pool);
  if (wakeUp === undefined) {
    // Sent for every watcher, not for the call that wrote: on the pool, not cancelled with the call.
    wakeUp = coalesced(
      () => pool`select set_config('synchronous_commit', 'off', true), pg_notify('key_events', '')`,
      wakeUpIntervalMs,
    );
    wakeUps.set(pool, wakeUp);
  }
  wakeUp.request();
}

// One statement decides and writes, so a freeze racing an unfreeze cannot
// interleave. The `locked` subquery takes the row lock and, under READ
// COMMITTED, yields the newest committed row, so the version check and the
// before-image are exact even when another write just landed. A repeated
// freeze rewrites the row with the values it has, which the version trigger
// sees as no change: `changed` compares the versions before and after.
async function applyFreeze(
  sql: Sql,
  change: FreezeChange & { readonly frozenAtUs?: Micros },
  set: ReturnType<Sql>,
): Promise<FreezeOutcome> {
  const versionCheck =
    change.expectedVersion === undefined
      ? sql``
      : sql`and locked.locked_version = ${change.expectedVersion.toString()}::int8`;
  // A key cannot have been frozen before it existed (a key already frozen keeps its freeze).
  const frozenAtCheck =
    change.frozenAtUs === undefined
      ? sql``
      : sql`and (is_frozen or ${timestampAt(sql, change.frozenAtUs)} >= created_at)`;
  type Result = Partial<KeyRow> & { key_created_us: bigint | null; locked_version: bigint | null };
  const [row]: [Result?] = await sql`
    with updated as (
      update api_keys
      set ${set}
      from (
        select id as locked_id, version as locked_version
        from api_keys
        where tenant_id = ${change.tenantId}
          and id = ${change.keyId}
        for update
      ) as locked
      where tenant_id = ${change.tenantId}
        and id = locked.locked_id
        ${versionCheck}
        ${frozenAtCheck}
      returning ${keyColumns(sql)}, locked.locked_version
    )
    select
      (
        select epoch_micros(created_at)
        from api_keys
        where tenant_id = ${change.tenantId}
          and id = ${change.keyId}
      ) as key_created_us,
      updated.*
    from (values (1)) as one
    left join updated on true
  `;
  const createdUs = row?.key_created_us;
  if (createdUs === null || createdUs === undefined) return { kind: "not_found" };
  if (!row?.id) {
    const early = change.frozenAtUs !== undefined && change.frozenAtUs < createdUs;
    return { kind: early ? "frozen_before_creation" : "stale" };
  }
  const { key_created_us: _created, locked_version, ...key } = row;
  const keyRow = key as KeyRow;
  const changed = keyRow.version !== locked_version;
  if (changed) wakeFeedReaders(sql);
  return { kind: "done", key: keyRow, changed };
}

/**
 * Freezes a key: is_frozen and frozen_at (at `frozenAtUs`, or the database's
 * clock) with reason and actor. A frozen key keeps its first freeze.
 */
export function updateKeyFrozen(
  sql: Sql,
  change: FreezeChange & { readonly frozenAtUs?: Micros },
): Promise<FreezeOutcome> {
  const frozenAt = change.frozenAtUs === undefined ? sql`now()` : timestampAt(sql, change.frozenAtUs);
  return applyFreeze(
    sql,
    change,
    sql`
      is_frozen = true,
      frozen_at = case when is_frozen then frozen_at else ${frozenAt} end,
      freeze_reason = case when is_frozen then freeze_reason else ${change.reason} end,
      freeze_actor = case when is_frozen then freeze_actor else ${change.actor} end
    `,
  );
}

/** Unfreezes a key: clears is_frozen and frozen_at, records reason and actor. */
export function updateKeyUnfrozen(sql: Sql, change: FreezeChange): Promise<FreezeOutcome> {
  return applyFreeze(
    sql,
    change,
    sql`
      unfrozen_at = case when is_frozen then now() else unfrozen_at end,
      unfreeze_reason = case when is_frozen then ${change.reason} else unfreeze_reason end,
      unfreeze_actor = case when is_frozen then ${change.actor} else unfreeze_actor end,
      is_frozen = false,
      frozen_at = null
    `,
  );
}

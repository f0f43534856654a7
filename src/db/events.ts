import type { Micros } from "../micros.js";
import { arrayLiteral, type Sql } from "./client.js";
import { type KeyRow, keyColumns } from "./keys.js";

/** What happened to a key. */
export type EventKind = "created" | "updated" | "frozen" | "unfrozen" | "deleted";

/** One row of key_events: a change of one key, and the key as it was after it. */
export interface EventRow {
  readonly position: bigint;
  readonly kind: EventKind;
  readonly changed_at_us: Micros;
  readonly reason: string | null;
  readonly actor: string | null;
  readonly db_role: string;
  readonly application: string;
  readonly key: KeyRow;
}

/** Which events a reader wants: one tenant's (optionally some of its keys), or every tenant's. */
export type EventScope =
  | { readonly allTenants: true }
  | { readonly allTenants: false; readonly tenantId: string; readonly keyIds: readonly string[] };

type FlatEventRow = Omit<EventRow, "key"> & Omit<KeyRow, "id"> & { key_id: string };

function eventColumns(sql: Sql) {
  return sql`
    position,
    kind,
    epoch_micros(changed_at) as changed_at_us,
    reason,
    actor,
    db_role,
    application,
    key_id,
    tenant_id,
    name,
    key_prefix,
    status,
    is_frozen,
    epoch_micros(frozen_at) as frozen_at_us,
    freeze_reason,
    freeze_actor,
    epoch_micros(created_at) as created_at_us,
    epoch_micros(last_used_at) as last_used_at_us,
    epoch_micros(expires_at) as expires_at_us,
    total_requests,
    version
  `;
}

function toEvent(row: FlatEventRow): EventRow {
  const { position, kind, changed_at_us, reason, actor, db_role, application, key_id, ...key } = row;
  return { position, kind, changed_at_us, reason, actor, db_role, application, key: { id: key_id, ...key } };
}

// Statements that read across tenants say so with this comment, which the
// tenant-scoping test (test/tenant-scoping.test.ts) accepts in place of a
// tenant_id predicate: the all-tenants watch, and the feed's head (a
// position, shared by every tenant's cursors).
function inScope(sql: Sql, scope: EventScope) {
  if (scope.allTenants) return sql`/* spans tenants: watching every tenant */`;
  const keys = scope.keyIds.length > 0 ? sql`and key_id = any(${arrayLiteral(scope.keyIds)}::uuid[])` : sql``;
  return sql`and tenant_id = ${scope.tenantId} ${keys}`;
}

/** Where the feed stands: its newest position, and the newest one retention has deleted. */
export interface FeedBounds {
  readonly head: bigint;
  readonly prunedThrough: bigint;
}

/** The feed's bounds, as one snapshot sees them. */
export async function feedBounds(sql: Sql): Promise<FeedBounds> {
  const [row]: [{ head: bigint; pruned_through: bigint }?] = await sql`
    select
      coalesce((select max(position) /* spans tenants: the head */ from key_events), r.pruned_through) as head,
      r.pruned_through
    from key_events_retention as r
    where r.singleton
  `;
  return { head: row?.head ?? 0n, prunedThrough: row?.pruned_through ?? 0n };
}

/** The later of two feed positions. */
export function laterPosition(a: bigint, b: bigint): bigint {
  return a > b ? a : b;
}

/** What one read of the feed found. */
export interface EventsRead {
  /** The events in scope, oldest first. */
  readonly events: EventRow[];
  /** Every event in scope up to here has now been read. */
  readonly through: bigint;
  /** False when the read stopped at its limit: read again from `through`. */
  readonly complete: boolean;
  /** The newest position the feed has. */
  readonly head: bigint;
  /** Events up to here were deleted by retention. */
  readonly prunedThrough: bigint;
}

/**
 * Events in `scope` after `position`, oldest first, at most `limit`, read in
 * one snapshot with the feed's head and retention mark.
 */
export async function fetchEventsAfter(
  sql: Sql,
  position: bigint,
  scope: EventScope,
  limit: number,
): Promise<EventsRead> {
  const rows = await sql<(FlatEventRow & { head: bigint; pruned_through: bigint })[]>`
    with page as (
      select ${eventColumns(sql)}
      from key_events
      where position > ${position}
        ${inScope(sql, scope)}
      order by position
      limit ${limit}
    )
    select page.*, bounds.head, bounds.pruned_through
    from (
      select
        coalesce((select max(position) /* spans tenants: the head */ from key_events), r.pruned_through) as head,
        r.pruned_through
      from key_events_retention as r
      where r.singleton
    ) as bounds
    left join page on true
    order by page.position
  `;
  const head = rows[0]?.head ?? 0n;
  const prunedThrough = rows[0]?.pruned_through ?? 0n;
  const events = rows
    .filter((r) => r.position !== null)
    .map(({ head: _head, pruned_through: _pruned, ...r }) => toEvent(r));
  const last = events.at(-1)?.position;
  if (events.length === limit && last !== undefined) {
    return { events, through: last, complete: false, head, prunedThrough };
  }
  return { events, through: laterPosition(head, position), complete: true, head, prunedThrough };
}

/**
 * The feed's head and the keys in `scope` as one snapshot sees them: first
 * `{ head }`, then the keys in batches. The snapshot is held (a repeatable
 * read transaction on a connection of its own) only while the caller keeps
 * reading, and for at most a minute of the caller's idling between batches.
 */
export async function* fetchKeysAtSnapshot(
  sql: Sql,
  scope: EventScope,
  batchSize = 500,
): AsyncGenerator<{ readonly head: bigint } | { readonly keys: KeyRow[] }> {
  const tx = await sql.reserve();
  let open = false;
  try {
    await tx`begin isolation level repeatable read read only`;
    open = true;
    await tx`set local idle_in_transaction_session_timeout = '60s'`;
    const [row]: [{ head: bigint }?] = await tx`
      select coalesce(max(position), 0) as head
      /* spans tenants: the head */ from key_events
    `;
    yield { head: row?.head ?? 0n };
    const keys = scope.allTenants
      ? tx<KeyRow[]>`
          select ${keyColumns(tx)}
          /* spans tenants: watching every tenant */ from api_keys
          order by tenant_id, id
        `
      : tx<KeyRow[]>`
          select ${keyColumns(tx)}
          from api_keys
          where tenant_id = ${scope.tenantId}
            ${scope.keyIds.length > 0 ? tx`and id = any(${arrayLiteral(scope.keyIds)}::uuid[])` : tx``}
          order by created_at desc, id desc
        `;
    for await (const batch of keys.cursor(batchSize)) yield { keys: batch };
    await tx`commit`;
    open = false;
  } finally {
    if (open) await tx`rollback`.catch(() => {});
    tx.release();
  }
}

/** A tenant's key changes (optionally one key's), newest first, before `before` when given. */
export async function listKeyChanges(
  sql: Sql,
  tenantId: string,
  options: { readonly keyId?: string; readonly before?: bigint; readonly limit: number },
): Promise<EventRow[]> {
  const rows = await sql<FlatEventRow[]>`
    select ${eventColumns(sql)}
    from key_events
    where tenant_id = ${tenantId}
      ${options.keyId === undefined ? sql`` : sql`and key_id = ${options.keyId}`}
      ${options.before === undefined ? sql`` : sql`and position < ${options.before}`}
    order by position desc
    limit ${options.limit}
  `;
  return rows.map(toEvent);
}

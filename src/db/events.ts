import { Code } from "@connectrpc/connect";
import { rpcError } from "../errors.js";
import type { Micros } from "../micros.js";
import { arrayLiteral, type Sql, type SqlOrTransaction } from "./client.js";
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

/**
 * Every event writer holds this lock, shared, from taking its position until
 * its transaction ends (migration 0004). Taking it exclusively waits until
 * every position taken so far is committed or abandoned. Only a snapshot
 * (the feed's first head, a stream's initial state) takes it so, for the
 * moment that takes; the feed's reader never waits on it (see
 * positionHolders). An arbitrary constant.
 */
const positionLockKey = 7_301_944_514n;

/**
 * How long a reader waits for the lock before giving up for now. A writer
 * normally holds it for the moment its commit takes; one that fired the
 * trigger early (SET CONSTRAINTS ... IMMEDIATE, or PREPARE TRANSACTION) holds
 * it until it ends, and while a reader waits, new writers queue behind the
 * reader. The bound keeps such a stall of the kill switch short.
 */
const positionLockTimeout = "200ms";

/** The lock was not granted within positionLockTimeout. */
export function isLockTimeout(err: unknown): boolean {
  return typeof err === "object" && err !== null && (err as { code?: unknown }).code === "55P03";
}

/**
 * Takes the position lock exclusively for the rest of `tx`: it waits until
 * every position taken so far is committed or abandoned, for at most
 * positionLockTimeout (then fails, see isLockTimeout).
 */
async function lockPositions(tx: SqlOrTransaction): Promise<void> {
  await tx`select set_config('lock_timeout', ${positionLockTimeout}, true)`;
  await tx`select pg_advisory_xact_lock(${positionLockKey.toString()}::int8)`;
}

/** The feed's newest position, at a moment when no position is being taken. */
export async function settledHead(sql: Sql): Promise<bigint> {
  return await sql.begin(async (tx) => {
    await lockPositions(tx);
    const [row]: [{ head: bigint }?] = await tx`
      select coalesce(max(position), 0) as head
      /* spans tenants: the head */ from key_events
    `;
    return row?.head ?? 0n;
  });
}

/** What the process's reader of the whole feed found. */
export interface FeedRead {
  /** New events, oldest first, with no position missing between them. */
  readonly events: EventRow[];
  /** Every position up to here is read: delivered, or known never to come. */
  readonly through: bigint;
  /** False when the read stopped at its limit: read again from `through`. */
  readonly complete: boolean;
  /**
   * A position missing below `visible`, a position the read saw: taken by a
   * commit still under way, or by a transaction that failed. Events after it
   * wait (see settledBelow).
   */
  readonly missing?: { readonly position: bigint; readonly visible: bigint };
}

/**
 * The whole feed after `position`, at most `limit` events, up to the first
 * position that is missing below visible ones, passing over those missing
 * at or below `settledThrough` (known never to come: see settledBelow).
 */
export async function readFeed(sql: Sql, position: bigint, limit: number, settledThrough: bigint): Promise<FeedRead> {
  const rows = await sql<FlatEventRow[]>`
    select ${eventColumns(sql)}
    from key_events /* spans tenants: the process's reader of the whole feed */
    where position > ${position}
    order by position
    limit ${limit}
  `;
  const events: EventRow[] = [];
  let through = position;
  for (const row of rows) {
    if (row.position !== through + 1n && row.position - 1n > settledThrough) {
      const visible = rows.at(-1)?.position ?? row.position;
      return {
        events,
        through,
        complete: true,
        missing: { position: laterPosition(through, settledThrough) + 1n, visible },
      };
    }
    events.push(toEvent(row));
    through = row.position;
  }
  return { events, through, complete: rows.length < limit };
}

/**
 * The transactions that may hold a position now, for settling positions
 * missing below one that a read saw: every writer takes the position lock
 * (shared) before its position and keeps it to its end, so a missing
 * position was taken by one of the lock's holders of that moment, or by a
 * transaction that has ended. Once none of them holds the lock any more, a
 * position still missing will never come. Only this database's holders of
 * this lock count: an unrelated long transaction holds back nothing.
 * Transactions are told apart by their virtual id, which a prepared
 * transaction keeps too. Unlike waiting on the lock, this holds back no
 * writer.
 */
export async function positionHolders(sql: Sql): Promise<string[]> {
  const rows = await sql<{ holder: string }[]>`
    select virtualtransaction as holder
    from pg_locks
    where locktype = 'advisory'
      and database = (select oid from pg_database where datname = current_database())
      and classid = ${String(positionLockKey >> 32n)}::oid
      and objid = ${String(positionLockKey & 0xffffffffn)}::oid
      and objsubid = 1
      and granted
  `;
  return rows.map((r) => r.holder);
}

/** True once none of `holders` (from positionHolders) holds the position lock. */
export async function holdersEnded(sql: Sql, holders: readonly string[]): Promise<boolean> {
  if (holders.length === 0) return true;
  const now = await positionHolders(sql);
  return !holders.some((h) => now.includes(h));
}

/** What a read of one scope's events found. */
export interface EventsRead {
  /** The events in scope, oldest first. */
  readonly events: EventRow[];
  /** Every event in scope up to here has now been read. */
  readonly through: bigint;
  /** False when the read stopped at its limit: read again from `through`. */
  readonly complete: boolean;
}

/**
 * Events in `scope` after `position` and up to `upTo`, oldest first, at most
 * `limit`. `upTo` must be a position the feed has read through, so that no
 * position below it can still appear.
 */
export async function fetchEventsBetween(
  sql: Sql,
  position: bigint,
  upTo: bigint,
  scope: EventScope,
  limit: number,
): Promise<EventsRead> {
  const rows = await sql<FlatEventRow[]>`
    select ${eventColumns(sql)}
    from key_events
    where position > ${position}
      and position <= ${upTo}
      ${inScope(sql, scope)}
    order by position
    limit ${limit}
  `;
  const events = rows.map(toEvent);
  const last = events.at(-1)?.position;
  if (events.length === limit && last !== undefined) return { events, through: last, complete: false };
  return { events, through: laterPosition(upTo, position), complete: true };
}

/**
 * The feed's head and the keys in `scope` as one snapshot sees them: first
 * `{ head }`, then the keys in batches. The snapshot is taken while no
 * position is being taken (the lock, exclusively, for the moment that
 * takes), so every change up to the head is in it and none after. It is held (a
 * repeatable read transaction on a connection of its own) only while the
 * caller keeps reading, and for at most a minute of the caller's idling
 * between batches; each batch is bound by the statement timeout.
 */
export async function* fetchKeysAtSnapshot(
  sql: Sql,
  scope: EventScope,
  batchSize = 500,
): AsyncGenerator<{ readonly head: bigint } | { readonly keys: KeyRow[] }> {
  const tx = await sql.reserve();
  let locked = false;
  let open = false;
  try {
    // Held by this session across the snapshot's first statement only.
    await tx`select set_config('lock_timeout', ${positionLockTimeout}, false)`;
    try {
      await tx`select pg_advisory_lock(${positionLockKey.toString()}::int8)`;
    } catch (err) {
      if (!isLockTimeout(err)) throw err;
      throw rpcError(Code.Unavailable, "a change to the keys is taking long to commit; retry", {
        reason: "WRITE_CONTENDED",
        retryAfterMs: 100,
      });
    } finally {
      await tx`reset lock_timeout`;
    }
    locked = true;
    await tx`begin isolation level repeatable read read only`;
    open = true;
    await tx`set local idle_in_transaction_session_timeout = '60s'`;
    const [row]: [{ head: bigint }?] = await tx`
      select coalesce(max(position), 0) as head
      /* spans tenants: the head */ from key_events
    `;
    await tx`select pg_advisory_unlock(${positionLockKey.toString()}::int8)`;
    locked = false;
    const head = row?.head ?? 0n;
    yield { head };
    // A cursor of the transaction's own, read with FETCH: each batch is a
    // statement of its own (the statement timeout applies per batch, not to
    // the whole walk), and nothing of the driver's stays suspended between
    // batches while the caller reads.
    await (scope.allTenants
      ? tx`
          declare snapshot_keys no scroll cursor for
          select ${keyColumns(tx)}
          /* spans tenants: watching every tenant */ from api_keys
          order by tenant_id, id
        `
      : tx`
          declare snapshot_keys no scroll cursor for
          select ${keyColumns(tx)}
          from api_keys
          where tenant_id = ${scope.tenantId}
            ${scope.keyIds.length > 0 ? tx`and id = any(${arrayLiteral(scope.keyIds)}::uuid[])` : tx``}
          order by created_at desc, id desc
        `);
    const fetch = `fetch forward ${Math.max(1, Math.trunc(batchSize))} from snapshot_keys`;
    for (;;) {
      const batch = await tx.unsafe<KeyRow[]>(fetch);
      if (batch.length === 0) break;
      yield { keys: [...batch] };
    }
    await tx`commit`;
    open = false;
  } finally {
    if (open) await tx`rollback`.catch(() => {});
    if (locked) await tx`select pg_advisory_unlock(${positionLockKey.toString()}::int8)`.catch(() => {});
    tx.release();
  }
}

/**
 * A tenant's key changes (optionally one key's), newest first, up to `upTo`
 * (a position the feed has read through), before `before` when given.
 */
export async function listKeyChanges(
  sql: Sql,
  tenantId: string,
  options: { readonly keyId?: string; readonly before?: bigint; readonly upTo: bigint; readonly limit: number },
): Promise<EventRow[]> {
  const rows = await sql<FlatEventRow[]>`
    select ${eventColumns(sql)}
    from key_events
    where tenant_id = ${tenantId}
      ${options.keyId === undefined ? sql`` : sql`and key_id = ${options.keyId}`}
      and position <= ${options.upTo}
      ${options.before === undefined ? sql`` : sql`and position < ${options.before}`}
    order by position desc
    limit ${options.limit}
  `;
  return rows.map(toEvent);
}

import type { Sql } from "../db/client.js";

/** Lets one pruning run at a time across every replica; an arbitrary constant. */
const pruneLockKey = 7_301_944_515n;
const batchPositions = 10_000;

/**
 * Deletes key changes older than `retentionDays` days, oldest first, a
 * batch of positions per transaction, and records how far it deleted
 * (key_events_retention.pruned_through): a WatchKeys cursor before that
 * point answers OUT_OF_RANGE. Positions grow with time, so what is deleted
 * is always a prefix of the feed. Returns how many changes it deleted; with
 * several replicas only the one holding the lock works.
 *
 * Like the usage rollup, this job spans tenants by nature.
 */
export async function pruneKeyEvents(sql: Sql, retentionDays: number): Promise<number> {
  let deleted = 0;
  for (;;) {
    const step = await sql.begin(async (tx) => {
      const [lock]: [{ locked: boolean }?] = await tx`
        select pg_try_advisory_xact_lock(${pruneLockKey.toString()}::int8) as locked
      `;
      if (!lock?.locked) return { deleted: 0, more: false };
      // spans tenants: retention applies to the whole feed.
      const [row]: [{ deleted: bigint; more: boolean }?] = await tx`
        with bound as (
          select
            old.newest as newest_old,
            least(old.newest, r.pruned_through + ${batchPositions}) as through
          from key_events_retention as r
          cross join (
            select max(position) as newest
            from key_events
            where changed_at < now() - ${retentionDays} * interval '1 day'
          ) as old
          where r.singleton
        ),
        gone as (
          delete from key_events
          where position <= (select through from bound where newest_old is not null)
          returning position
        ),
        moved as (
          update key_events_retention
          set pruned_through = greatest(pruned_through, bound.through)
          from bound
          where singleton and bound.newest_old is not null
        )
        select
          (select count(*) from gone) as deleted,
          coalesce((select through < newest_old from bound), false) as more
      `;
      return { deleted: Number(row?.deleted ?? 0n), more: row?.more ?? false };
    });
    deleted += step.deleted;
    if (!step.more) return deleted;
  }
}

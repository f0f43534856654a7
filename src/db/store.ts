import { isStrayCancel, type Sql } from "./client.js";
import * as events from "./events.js";
import * as keys from "./keys.js";
import * as usage from "./usage.js";

export type { Micros } from "../micros.js";
export type { EventKind, EventRow, EventScope, EventsRead } from "./events.js";
export type { FreezeChange, FreezeOutcome, KeyCursor, KeyRow } from "./keys.js";
export type { UsageRow } from "./usage.js";

/**
 * The statements the rpcs run, one per operation and named after it (WatchKeys
 * reads the feed through fetchEventsAfter and fetchKeysAtSnapshot).
 */
const operations = {
  fetchKeys: keys.fetchKeys,
  countKeys: keys.countKeys,
  fetchKeyById: keys.fetchKeyById,
  fetchKeyUsage: usage.fetchKeyUsage,
  fetchKeyForUpdate: keys.fetchKeyForUpdate,
  updateKeyFrozen: keys.updateKeyFrozen,
  updateKeyUnfrozen: keys.updateKeyUnfrozen,
  feedBounds: events.feedBounds,
  fetchEventsBetween: events.fetchEventsBetween,
  fetchKeysAtSnapshot: events.fetchKeysAtSnapshot,
  listKeyChanges: events.listKeyChanges,
};

type Operations = typeof operations;

/**
 * What the handlers read and write through: each operation with its
 * connection pool already given. Handlers depend on this shape rather than
 * on SQL, so a test can hand them an in-memory store.
 */
export type Store = {
  readonly [K in keyof Operations]: Operations[K] extends (sql: Sql, ...args: infer A) => infer R
    ? (...args: A) => R
    : never;
};

/** How many times an operation hit by another call's late cancel is run again. */
const strayCancelRetries = 3;

/**
 * The Store backed by PostgreSQL through `sql`. Each operation is one
 * statement or one transaction, so one cancelled by a cancel meant for
 * another call (isStrayCancel) changed nothing and runs again.
 */
export function createStore(sql: Sql): Store {
  const bound: Record<string, unknown> = {};
  for (const [name, operation] of Object.entries(operations)) {
    const run = (...args: unknown[]) => (operation as (sql: Sql, ...args: unknown[]) => unknown)(sql, ...args);
    bound[name] = (...args: unknown[]) => {
      const first = run(...args);
      if (!(first instanceof Promise)) return first; // a stream (fetchKeysAtSnapshot)
      return (async () => {
        for (let attempt = 0; ; attempt++) {
          try {
            return await (attempt === 0 ? first : run(...args));
          } catch (err) {
            if (attempt >= strayCancelRetries || !isStrayCancel(err)) throw err;
          }
        }
      })();
    };
  }
  return bound as Store;
}

import type { Sql } from "./client.js";
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

/** The Store backed by PostgreSQL through `sql`. */
export function createStore(sql: Sql): Store {
  const bound: Record<string, unknown> = {};
  for (const [name, operation] of Object.entries(operations)) {
    bound[name] = (...args: unknown[]) => (operation as (sql: Sql, ...args: unknown[]) => unknown)(sql, ...args);
  }
  return bound as Store;
}

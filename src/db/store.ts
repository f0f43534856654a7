import { isStrayCancel, type Sql, type StatementScope, sqlForCall } from "./client.js";
import * as events from "./events.js";
import * as keys from "./keys.js";
import * as usage from "./usage.js";
import * as usageReport from "./usage-report.js";

export type { Micros } from "../micros.js";
export type { EventKind, EventRow, EventScope, EventsRead } from "./events.js";
export type { FreezeChange, FreezeOutcome, KeyCursor, KeyRow } from "./keys.js";
export type { UsageRow } from "./usage.js";
export type {
  BucketWidth,
  ReportOrder,
  ReportOutcome,
  ReportPosition,
  ReportQuery,
  ReportRow,
} from "./usage-report.js";

/**
 * The statements the rpcs run, one per operation and named after it (WatchKeys
 * reads the feed through fetchEventsAfter and fetchKeysAtSnapshot).
 */
const operations = {
  fetchKeys: keys.fetchKeys,
  countKeys: keys.countKeys,
  fetchKeyById: keys.fetchKeyById,
  fetchKeyUsage: usage.fetchKeyUsage,
  fetchUsageReport: usageReport.fetchUsageReport,
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

/** A Store whose operations can be tied to one call, to be cancelled with it. */
export interface CallScopedStore extends Store {
  /** The store for one call: its statements are cancelled when `scope` aborts; no scope, this one. */
  forCall(scope: StatementScope | undefined): Store;
}

const sqlOf = Symbol("sql");
const scopeOf = Symbol("scope");
interface BoundStore {
  readonly [sqlOf]: Sql;
  readonly [scopeOf]: StatementScope | undefined;
}

/**
 * The Store backed by PostgreSQL through `sql`. Each operation is one
 * statement or one transaction, so one cancelled by a cancel meant for
 * another call (isStrayCancel) changed nothing and runs again. The
 * operations live on one prototype; a call's store is one object over it
 * with the call's sql (forCall).
 */
export function createStore(sql: Sql): CallScopedStore {
  const methods: Record<string | symbol, unknown> = {};
  for (const [name, operation] of Object.entries(operations)) {
    const run = operation as (sql: Sql, ...args: unknown[]) => unknown;
    methods[name] = function (this: BoundStore, ...args: unknown[]) {
      const callSql = this[sqlOf];
      const scope = this[scopeOf];
      const first = run(callSql, ...args);
      if (!(first instanceof Promise)) return first; // a stream (fetchKeysAtSnapshot)
      return (async () => {
        for (let attempt = 0; ; attempt++) {
          try {
            return await (attempt === 0 ? first : run(callSql, ...args));
          } catch (err) {
            if (attempt >= strayCancelRetries || !isStrayCancel(err, scope)) throw err;
          }
        }
      })();
    };
  }
  const root = Object.create(methods) as Record<symbol, unknown> & CallScopedStore;
  root[sqlOf] = sql;
  root[scopeOf] = undefined;
  methods.forCall = (scope: StatementScope | undefined): Store => {
    if (!scope) return root;
    const store = Object.create(methods) as Record<symbol, unknown>;
    store[sqlOf] = sqlForCall(sql, scope);
    store[scopeOf] = scope;
    return store as unknown as Store;
  };
  return root;
}

import type { Context, Tracer } from "@opentelemetry/api";
import type Postgres from "postgres";
import { endStatementSpan, startStatementSpan } from "../tracing.js";
import postgres from "./postgres.js";

/** The postgres.js client type this service runs its SQL on. */
export type Sql = Postgres.Sql<{ bigint: bigint }>;

/** A pool or the transaction `sql.begin` hands its callback: what a statement or fragment can be built with. */
export type SqlOrTransaction = Sql | Postgres.TransactionSql<{ bigint: bigint }>;

/** How to reach and use the database. */
export interface SqlOptions {
  /** A postgres:// connection URL. */
  readonly url: string;
  /** Connections in the pool. */
  readonly poolMax: number;
  /** Server-side cap on one statement, in milliseconds; 0 = none. */
  readonly statementTimeoutMs: number;
  /**
   * The session's application_name, which the database records with every
   * key change; default "keys-driver-service", the name under which the
   * database leaves waking the feed's readers to the writer (migration 0004).
   */
  readonly applicationName?: string;
  /**
   * The role every statement runs as (set when a connection opens, as SET
   * ROLE would): the service's least-privileged role (migration 0007). Unset:
   * the URL's user, as it is.
   */
  readonly role?: string;
  /** How long to wait for a connection, in seconds; postgres.js's default (30) when unset. */
  readonly connectTimeoutSeconds?: number;
  /** Sees the text and parameters of every statement sent (tests, benchmark). */
  readonly onQuery?: (query: string, parameters: readonly unknown[]) => void;
}

/** The wait before a pool's next connection attempt, after `failures` failed ones: 50 ms doubling, up to 1 s. */
export function reconnectDelaySeconds(failures: number): number {
  return Math.min(0.05 * 2 ** failures, 1) * (0.5 + Math.random() / 2);
}

/**
 * Opens a pool. int8 columns arrive as bigint (never a lossy number), every
 * connection runs in UTC, and every statement's result is checked against
 * the row count the server reported (see checkedResults).
 *
 * `max_pipeline: 1` sends one query at a time per connection: postgres.js's
 * default (up to 100 queued on a connection) decays under sustained load in
 * 3.4.x as that queue grows costly to maintain (docs/DESIGN.md); a busy pool
 * still runs `poolMax` queries at once.
 */
export function createSql(options: SqlOptions): Sql {
  // max_pipeline is a real option that the bundled type definitions omit; a
  // variable (rather than a literal) lets it through the excess-property check.
  const pipeline = { max_pipeline: 1 };
  const sql = postgres(options.url, {
    ...pipeline,
    max: options.poolMax,
    ...(options.connectTimeoutSeconds ? { connect_timeout: options.connectTimeoutSeconds } : {}),
    types: { bigint: postgres.BigInt },
    connection: {
      TimeZone: "UTC",
      jit: "off",
      application_name: options.applicationName ?? "keys-driver-service",
      ...(options.role ? { role: options.role } : {}),
      ...(options.statementTimeoutMs > 0 ? { statement_timeout: options.statementTimeoutMs } : {}),
    },
    // No array-type lookup when a connection opens: a failure of that lookup
    // (a statement timeout, a terminated backend) is an unhandled rejection
    // inside postgres.js that ends the process. Arrays are sent as literals
    // (arrayLiteral) instead.
    fetch_types: false,
    // After a connection fails, postgres.js waits before the next attempt,
    // longer with every failure the pool has had since its last success: up
    // to 20 s by default, which after a restart of the database kept calls
    // waiting (and past their deadlines) long after it was back. At most a
    // second here, with jitter: a pool of 10 tries 10 connections a second
    // while the database is down.
    backoff: reconnectDelaySeconds,
    onnotice: () => {},
    ...(options.onQuery
      ? { debug: (_connection: number, query: string, parameters: unknown[]) => options.onQuery?.(query, parameters) }
      : {}),
  });
  return checkedResults(sql);
}

/** The pool's connections by state, and the statements waiting for one. */
export interface PoolState {
  readonly queued: number;
  readonly connecting: number;
  readonly idle: number;
  readonly busy: number;
  readonly reserved: number;
  readonly closed: number;
}

const poolStateKey = Symbol.for("keys-driver-service.pool");

/** What `sql`'s pool holds now (read from postgres.js by ./postgres-fixes.js). */
export function poolState(sql: Sql): PoolState {
  const read = (sql as unknown as Record<symbol, (() => PoolState) | undefined>)[poolStateKey];
  if (!read) throw new Error("postgres.js was loaded without src/db/postgres-fixes.js: no view of its pool");
  return read();
}

/**
 * A list of strings as a PostgreSQL array literal, e.g. `{"a","b"}`, to be
 * sent as one parameter and cast in SQL (`${arrayLiteral(ids)}::uuid[]`).
 */
export function arrayLiteral(values: readonly string[]): string {
  return `{${values.map((v) => `"${v.replaceAll("\\", "\\\\").replaceAll('"', '\\"')}"`).join(",")}}`;
}

/**
 * `query`, sent as an unnamed statement: planned for its own parameter values
 * each time it runs, never as a prepared statement whose generic plan
 * PostgreSQL may switch to after a few runs. For statements whose best plan
 * depends on the values (a report's window: a day or a tenant's 90 days;
 * docs/DESIGN.md). postgres.js keeps the choice in the query's options, as
 * its own simple() does.
 */
export function unprepared<Q>(query: Q): Q {
  (query as unknown as { options: { prepare?: boolean } }).options.prepare = false;
  return query;
}

/** A statement's result did not hold the rows the server sent; it was not used. */
export class ResultMismatchError extends Error {
  constructor(rows: number, count: number) {
    super(`the database driver returned ${rows} rows for a statement that produced ${count}`);
    this.name = "ResultMismatchError";
  }
}

interface PendingQuery {
  resolve(result: unknown): void;
  reject(error: unknown): void;
}

function isPendingQuery(value: unknown): value is PendingQuery {
  return value instanceof Promise && typeof (value as Partial<PendingQuery>).resolve === "function";
}

// A statement with rows resolves with exactly as many as the server's
// command tag counts ("SELECT 3", "UPDATE 1" with RETURNING). Statements
// that return no rows (an INSERT without RETURNING) resolve empty. Several
// statements in one simple query resolve with one such result each.
function checkResult(result: unknown): ResultMismatchError | undefined {
  if (!Array.isArray(result) || result.length === 0) return undefined;
  const count = (result as { count?: unknown }).count;
  if (typeof count === "number")
    return result.length === count ? undefined : new ResultMismatchError(result.length, count);
  for (const part of result) {
    if (Array.isArray(part) && typeof (part as { count?: unknown }).count === "number") {
      const mismatch = checkResult(part);
      if (mismatch) return mismatch;
    }
  }
  return undefined;
}

/** The tracer and parent (the call's span) of a call's statement spans. */
export interface StatementTrace {
  readonly tracer: Tracer;
  readonly parent: Context;
}

/**
 * The statements of one call, to be cancelled together when the call ends
 * early. A plain object rather than an AbortSignal: it is made for every
 * call and told of every statement, and EventTarget costs more.
 */
export class StatementScope {
  aborted = false;
  reason: unknown;
  private cancels: Set<() => void> | undefined;

  /** `trace`: where the statements' spans go, when tracing is on. */
  constructor(readonly trace?: StatementTrace) {}

  /** Calls `cancel` on abort (at once if already aborted); returns how to stop that. */
  onAbort(cancel: () => void): () => void {
    if (this.aborted) {
      cancel();
      return () => {};
    }
    this.cancels ??= new Set();
    const cancels = this.cancels;
    cancels.add(cancel);
    return () => cancels.delete(cancel);
  }

  abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    const cancels = this.cancels;
    this.cancels = undefined;
    for (const cancel of cancels ?? []) cancel();
  }
}

/**
 * Where a call's context carries the scope of its statements: set where the
 * call's handler is run (src/interceptors.ts), read by the handler to get the
 * call's store. A property of the context rather than a WeakMap entry: it is
 * set on every call, and a WeakMap's entries cost the garbage collector more.
 */
export const callStatements = Symbol("callStatements");

/** A handler context that may carry its call's statement scope. */
export interface WithCallStatements {
  [callStatements]?: StatementScope;
}

/** The scope of the call with `context`, if its statements are tied to one. */
export function callStatementsOf(context: object | undefined): StatementScope | undefined {
  return (context as WithCallStatements | undefined)?.[callStatements];
}

/**
 * A statement cancelled "due to user request" that the current call did not
 * cancel. PostgreSQL's cancel names a backend, not a statement: a cancel
 * sent for a call's statement that arrives only after that statement ended
 * (a database that was not answering, then answers everything at once)
 * cancels whatever runs next on that connection, another call's. Such a
 * statement did nothing and can be run again (see ./store.ts).
 */
export function isStrayCancel(err: unknown, scope?: StatementScope): boolean {
  if (typeof err !== "object" || err === null) return false;
  const { code, message } = err as { code?: unknown; message?: unknown };
  return code === "57014" && typeof message === "string" && message.includes("user request") && scope?.aborted !== true;
}

interface CancellableQuery {
  /** Handed to the pool: queued, or sent to a connection. */
  executed?: boolean;
  canceller?: ((query: unknown) => Promise<void> | undefined) | null;
}

// Cancels `query` when `scope` aborts; returns how to stop that once it settles.
function cancelOnAbort(query: PendingQuery & CancellableQuery, scope: StatementScope): () => void {
  if (scope.aborted) throw scope.reason;
  return scope.onAbort(() => {
    // A query never handed to the pool (a fragment of another, or one not
    // awaited) is left alone. postgres.js's own cancel() drops the promise
    // of the CancelRequest's connection, whose failure (a database that
    // does not answer) would then go unhandled.
    if (!query.executed || !query.canceller) return;
    const cancel = query.canceller;
    query.canceller = null;
    void cancel(query)?.catch(() => {});
  });
}

function checkQuery(query: unknown, scope: StatementScope | undefined): void {
  if (!isPendingQuery(query)) return;
  const stop = scope ? cancelOnAbort(query, scope) : undefined;
  const span = scope?.trace ? startStatementSpan(scope.trace.tracer, scope.trace.parent) : undefined;
  const { resolve, reject } = query;
  query.resolve = (result) => {
    stop?.();
    const mismatch = checkResult(result);
    if (span) endStatementSpan(span, (query as { string?: unknown }).string, mismatch);
    if (mismatch) reject(mismatch);
    else resolve(result);
  };
  query.reject = (error) => {
    stop?.();
    if (span) endStatementSpan(span, (query as { string?: unknown }).string, error);
    reject(error);
  };
}

const rawKey = Symbol("raw sql");
const rootKey = Symbol("unscoped sql");

/**
 * The traps of a checked `sql` (see checkedResults): a class, so that the
 * `sql` of each call is one Proxy and one small object.
 */
class CheckedSql implements ProxyHandler<Sql> {
  constructor(
    private readonly scope: StatementScope | undefined,
    private readonly root: Sql | undefined,
  ) {}

  apply(target: Sql, self: unknown, args: unknown[]): unknown {
    const query: unknown = Reflect.apply(target as unknown as (...a: unknown[]) => unknown, self, args);
    checkQuery(query, this.scope);
    return query;
  }

  get(target: Sql, property: string | symbol, receiver: unknown): unknown {
    if (property === rawKey) return target;
    if (property === rootKey) return this.root ?? receiver;
    const value: unknown = Reflect.get(target, property, receiver);
    if (typeof value !== "function") return value;
    const scope = this.scope;
    switch (property) {
      case "unsafe":
        return (...args: unknown[]) => {
          const query: unknown = Reflect.apply(value, target, args);
          checkQuery(query, scope);
          return query;
        };
      case "begin":
      case "savepoint":
        // begin([options,] fn) and savepoint([name,] fn): the sql they hand fn is checked too.
        return (...args: unknown[]) => {
          const last = args.at(-1);
          if (typeof last === "function") {
            args[args.length - 1] = (tx: Sql) => last(checkedResults(tx, scope));
          }
          return Reflect.apply(value, target, args);
        };
      case "reserve":
        return async () => checkedResults(await (value as () => Promise<Sql>).call(target), scope);
      default:
        return value;
    }
  }
}

/**
 * `sql`, with every statement it (and every transaction, savepoint or
 * reserved connection it opens) runs checked before it resolves: a result whose
 * length differs from the server's row count fails the statement with
 * ResultMismatchError instead of reaching a caller. postgres.js 3.4.x can
 * produce such a result after a statement fails part-way (see
 * ./postgres-fixes.js, which fixes the cause); this guard keeps any
 * recurrence from turning into a wrong answer. With a `scope`, every
 * statement is also cancelled when the scope aborts (see sqlForCall).
 */
export function checkedResults<S extends Sql>(sql: S, scope?: StatementScope, root?: Sql): S {
  return new Proxy(sql, new CheckedSql(scope, root)) as S;
}

/**
 * The pool `sql` for one call: every statement it starts is cancelled when
 * `scope` aborts (the caller's deadline passed, or it cancelled): a
 * statement waiting for a connection leaves the queue, one running is
 * cancelled on the server (a CancelRequest, as psql's Ctrl-C), and one
 * started afterwards fails at once with the scope's reason instead of
 * running after the caller has gone. Passed explicitly, not found through
 * the async context: AsyncLocalStorage costs every promise of the process
 * a hook on Node 20.
 */
export function sqlForCall(sql: Sql, scope: StatementScope): Sql {
  const tagged = sql as unknown as Record<symbol, Sql | undefined>;
  return checkedResults(tagged[rawKey] ?? sql, scope, tagged[rootKey] ?? sql);
}

/**
 * The pool `sql` a call's `sql` came from, tied to no call: for statements
 * a call starts on behalf of others (a wake-up sent after a write), which
 * must outlive it.
 */
export function unscopedSql(sql: Sql): Sql {
  return (sql as unknown as Record<symbol, Sql | undefined>)[rootKey] ?? sql;
}

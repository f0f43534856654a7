import postgres from "postgres";

/** The postgres.js client type this service runs its SQL on. */
export type Sql = postgres.Sql<{ bigint: bigint }>;

/** How to reach and use the database. */
export interface SqlOptions {
  /** A postgres:// connection URL. */
  readonly url: string;
  /** Connections in the pool. */
  readonly poolMax: number;
  /** Server-side cap on one statement, in milliseconds; 0 = none. */
  readonly statementTimeoutMs: number;
  /** Sees the text and parameters of every statement sent (tests, benchmark). */
  readonly onQuery?: (query: string, parameters: readonly unknown[]) => void;
}

/**
 * Opens a pool. int8 columns arrive as bigint (never a lossy number), and
 * every connection runs in UTC.
 *
 * `max_pipeline: 1` sends one query at a time per connection. postgres.js's
 * default (100 queued on a connection) keeps throughput high at first but
 * decays under sustained load in 3.4.x, as its per-connection queue grows
 * costly to maintain; one in flight per connection holds steady, and a busy
 * pool still runs `poolMax` queries at once. The benchmark's soak mode
 * watches for a regression.
 */
export function createSql(options: SqlOptions): Sql {
  // max_pipeline is a real option that the bundled type definitions omit; a
  // variable (rather than a literal) lets it through the excess-property check.
  const pipeline = { max_pipeline: 1 };
  return postgres(options.url, {
    ...pipeline,
    max: options.poolMax,
    types: { bigint: postgres.BigInt },
    connection: {
      TimeZone: "UTC",
      application_name: "keys-driver-service",
      ...(options.statementTimeoutMs > 0 ? { statement_timeout: options.statementTimeoutMs } : {}),
    },
    onnotice: () => {},
    ...(options.onQuery
      ? { debug: (_connection: number, query: string, parameters: unknown[]) => options.onQuery?.(query, parameters) }
      : {}),
  });
}

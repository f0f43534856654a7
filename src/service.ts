import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { type Config, StartError } from "./config.js";
import { createSql, type Sql } from "./db/client.js";
import { findServiceSecret } from "./db/secrets.js";
import { createStore } from "./db/store.js";
import type { ErrorLogger } from "./errors.js";
import { createMetrics, type Metrics, type MetricsSnapshot, renderMetrics } from "./metrics.js";
import { createKeysDriverService } from "./rpc/keys-driver.js";
import { createPageTokenCodec } from "./rpc/page-token.js";
import { registration, startServer } from "./server.js";

/** The settings serving needs, with the database already chosen. */
export type ServiceConfig = Pick<Config, "host" | "port" | "poolMax" | "statementTimeoutMs" | "pageTokenSecret"> & {
  /** A postgres:// URL of a migrated database. */
  readonly databaseUrl: string;
};

/** Ways to watch or adjust a service, for the executable, tests and benchmark. */
export interface ServiceHooks {
  /** Told the cause of every INTERNAL or UNAVAILABLE answer; default: stderr. */
  readonly logError?: ErrorLogger;
  /** Sees every statement sent (tests). */
  readonly onQuery?: (query: string, parameters: readonly unknown[]) => void;
  /** The /metrics text from this process's counts; default: this process alone. */
  readonly metricsText?: (own: MetricsSnapshot) => string;
}

/** KeysDriverService, serving. */
export interface RunningService {
  /** "host:port", for clients. */
  readonly address: string;
  readonly port: number;
  /** The service's connection pool. */
  readonly sql: Sql;
  /** This process's call counts. */
  readonly metrics: Metrics;
  /** Drains calls in flight for up to `graceMs`, stops serving, then closes the pool. */
  close(graceMs?: number): Promise<void>;
}

/**
 * Turns configuration into a running service: the pool, the page-token
 * secret, the handlers over the PostgreSQL store, and the server on its
 * port. The executable, worker mode, the tests and the benchmark all start
 * the service through here.
 */
export async function startService(config: ServiceConfig, hooks: ServiceHooks = {}): Promise<RunningService> {
  const sql = createSql({
    url: config.databaseUrl,
    poolMax: config.poolMax,
    statementTimeoutMs: config.statementTimeoutMs,
    onQuery: hooks.onQuery,
  });
  try {
    const secret = config.pageTokenSecret ?? (await findServiceSecret(sql, "page_token"));
    if (!secret) throw new StartError("the page token secret is missing from service_secrets; run `npm run migrate`");
    const metrics = createMetrics();
    const server = await startServer({
      services: [
        registration(KeysDriverService, createKeysDriverService(createStore(sql), createPageTokenCodec(secret))),
      ],
      observers: { metrics, logError: hooks.logError },
      host: config.host,
      port: config.port,
      metricsText: () => (hooks.metricsText ?? ((own) => renderMetrics(own, 1)))(metrics.snapshot()),
    });
    return {
      address: server.address,
      port: server.port,
      sql,
      metrics,
      async close(graceMs) {
        await server.close(graceMs);
        await sql.end({ timeout: 5 });
      },
    };
  } catch (err) {
    await sql.end({ timeout: 1 });
    throw err;
  }
}

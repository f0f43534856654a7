import type { Tracer } from "@opentelemetry/api";
import type { Registry } from "prom-client";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { type Config, StartError } from "./config.js";
import { createSql, poolState, type Sql } from "./db/client.js";
import { startDatabaseProbe } from "./db/probe.js";
import { findServiceSecret } from "./db/secrets.js";
import { createStore } from "./db/store.js";
import type { ErrorLogger } from "./errors.js";
import { type KeyFeed, startKeyFeed } from "./feed/key-feed.js";
import { createLogger, type Logger } from "./log.js";
import { createMetrics, type Metrics } from "./metrics.js";
import { createPositionTokens } from "./rpc/cursors.js";
import { HealthState } from "./rpc/health.js";
import { createKeysDriverService } from "./rpc/keys-driver.js";
import { createPageTokenCodec } from "./rpc/page-token.js";
import { createTokenSigner } from "./rpc/signed-token.js";
import { AccessControl } from "./security/access.js";
import { readAccessPolicy, readTlsMaterial, type TlsMaterial, watchFiles } from "./security/tls.js";
import { registration, startServer } from "./server.js";
import { tracingFromEnv } from "./tracing.js";

/** The settings serving needs, with the database already chosen. */
export type ServiceConfig = Pick<
  Config,
  | "host"
  | "port"
  | "databaseRole"
  | "poolMax"
  | "statementTimeoutMs"
  | "pageTokenSecret"
  | "watchProgressIntervalMs"
  | "watchMaxQueuedChanges"
  | "watchPollIntervalMs"
> &
  Partial<Pick<Config, "logLevel" | "tls" | "authPolicyFile" | "tlsReloadIntervalMs">> & {
    /** A postgres:// URL of a migrated database. */
    readonly databaseUrl: string;
    /** Connection limits; the defaults (defaultConnectionLimits) for what is not given. */
    readonly connectionLimits?: Partial<Config["connectionLimits"]>;
  };

/** Ways to watch or adjust a service, for the executable, tests and benchmark. */
export interface ServiceHooks {
  /** Told the cause of every INTERNAL or UNAVAILABLE answer; default: the log, at error. */
  readonly logError?: ErrorLogger;
  /** The structured log (src/log.ts); default: JSON lines on stdout at config.logLevel. */
  readonly logger?: Logger;
  /** Traces calls with this tracer; default: as OTEL_* configures (src/tracing.ts), usually off. */
  readonly tracer?: Tracer;
  /** Sees every statement sent (tests). */
  readonly onQuery?: (query: string, parameters: readonly unknown[]) => void;
  /** The /metrics text, given this process's registry; default: this process's metrics alone. */
  readonly metricsText?: (own: Registry) => Promise<string>;
}

/** KeysDriverService, serving. */
export interface RunningService {
  /** "host:port", for clients. */
  readonly address: string;
  readonly port: number;
  /** The service's connection pool. */
  readonly sql: Sql;
  /** This process's metrics. */
  readonly metrics: Metrics;
  /** The process's feed of key changes. */
  readonly feed: KeyFeed;
  /** Drains calls in flight for up to `graceMs`, stops serving, then closes the pool. */
  close(graceMs?: number): Promise<void>;
}

/**
 * How often the database is asked whether it answers, and how long it may
 * take: Health and /readyz turn NOT_SERVING within about twice this after
 * it stops answering, and SERVING again within this after it is back.
 */
const healthProbeIntervalMs = 1000;

/**
 * Turns configuration into a running service: the pool, the page-token
 * secret, the handlers over the PostgreSQL store, and the server on its
 * port. The executable, worker mode, the tests and the benchmark all start
 * the service through here.
 */
export async function startService(config: ServiceConfig, hooks: ServiceHooks = {}): Promise<RunningService> {
  const logger = hooks.logger ?? createLogger(config.logLevel);
  const tracing = hooks.tracer ? undefined : await tracingFromEnv();
  const tracer = hooks.tracer ?? tracing?.tracer;
  const logError = hooks.logError ?? ((message: string, cause: unknown) => logger.error({ err: cause }, message));
  const sql = createSql({
    url: config.databaseUrl,
    poolMax: config.poolMax,
    statementTimeoutMs: config.statementTimeoutMs,
    role: config.databaseRole,
    onQuery: hooks.onQuery,
  });
  let feed: KeyFeed | undefined;
  let probe: { close(): Promise<void> } | undefined;
  let reloads: { close(): void } | undefined;
  try {
    const security = await startSecurity(config, logError);
    reloads = security.reloads;
    const secret = config.pageTokenSecret ?? (await findServiceSecret(sql, "page_token"));
    if (!secret) throw new StartError("the page token secret is missing from service_secrets; run `npm run migrate`");
    const signer = createTokenSigner(secret);
    const running = startKeyFeed(sql, {
      pollIntervalMs: config.watchPollIntervalMs,
      onError: (err) => logError("the feed of key changes cannot read the database; retrying", err),
    });
    feed = running;
    const metrics = createMetrics({ pool: () => poolState(sql), watchStreams: () => running.subscribers });
    const handlers = createKeysDriverService({
      store: createStore(sql),
      pageTokens: createPageTokenCodec(signer),
      positions: createPositionTokens(signer),
      feed,
      watch: {
        progressIntervalMs: config.watchProgressIntervalMs,
        maxQueuedChanges: config.watchMaxQueuedChanges,
        // Each initial state holds a connection while it is read: half the pool at most.
        initialStateReaders: Math.max(1, Math.floor(config.poolMax / 2)),
      },
    });
    const health = new HealthState();
    probe = startDatabaseProbe(config.databaseUrl, {
      intervalMs: healthProbeIntervalMs,
      timeoutMs: healthProbeIntervalMs,
      onChange: (reachable) => health.setDatabaseReachable(reachable),
    });
    const server = await startServer({
      services: [registration(KeysDriverService, handlers)],
      observers: { metrics, logError, logger, tracer, access: security.access },
      health,
      tls: security.material,
      limits: config.connectionLimits,
      host: config.host,
      port: config.port,
      metricsText: () => (hooks.metricsText ?? ((own) => own.metrics()))(metrics.registry),
    });
    security.onReload((material) => server.setTls(material));
    const probing = probe;
    return {
      address: server.address,
      port: server.port,
      sql,
      metrics,
      feed: running,
      async close(graceMs) {
        // Streams end first (UNAVAILABLE: reconnect elsewhere) and are given a
        // moment to send that status, so that the drain waits only for calls
        // that finish by themselves.
        running.endSubscriptions();
        const streamsGone = Date.now() + Math.min(graceMs ?? 10_000, 2_000);
        while (running.subscribers > 0 && Date.now() < streamsGone) await new Promise((r) => setTimeout(r, 10));
        await server.close(graceMs);
        security.reloads?.close();
        await probing.close();
        await running.close();
        await sql.end({ timeout: 5 });
        await tracing?.shutdown();
      },
    };
  } catch (err) {
    reloads?.close();
    await probe?.close();
    await feed?.close();
    await sql.end({ timeout: 1 });
    await tracing?.shutdown();
    throw err;
  }
}

/**
 * TLS, mutual TLS and the access policy, as configured: read and checked
 * now (a problem stops the start, naming its variable), then re-read when
 * the files change (a problem is logged, and what was in use stays).
 */
async function startSecurity(config: ServiceConfig, logError: ErrorLogger) {
  const files = config.tls;
  const policyFile = config.authPolicyFile;
  let applyTls: (material: TlsMaterial) => void = () => {};
  const onReload = (apply: (material: TlsMaterial) => void) => {
    applyTls = apply;
  };
  if (!files) return { material: undefined, access: undefined, reloads: undefined, onReload };
  const watched = [files.certFile, files.keyFile, files.clientCaFile, policyFile].filter((f) => f !== undefined);
  const services = [KeysDriverService];
  let access: AccessControl | undefined;
  const reloads = await watchFiles(
    watched,
    config.tlsReloadIntervalMs ?? 10_000,
    // Each is applied on its own: a typo in the policy must not keep a
    // renewed certificate out (and let the old one expire), nor the reverse.
    async () => {
      await readTlsMaterial(files).then(applyTls, (err: unknown) =>
        logError("the TLS files changed but cannot be used; keeping the ones in use", err),
      );
      if (policyFile === undefined) return;
      await readAccessPolicy(policyFile, services).then(
        (policy) => access?.replacePolicy(policy),
        (err: unknown) => logError("the access policy changed but cannot be used; keeping the one in use", err),
      );
    },
    (err) => logError("the TLS files or the access policy could not be read again", err),
  );
  try {
    const material = await readTlsMaterial(files);
    if (material.requestCert) {
      access = new AccessControl(policyFile === undefined ? undefined : await readAccessPolicy(policyFile, services));
    }
    return { material, access, reloads, onReload };
  } catch (err) {
    reloads.close();
    throw err;
  }
}

import os from "node:os";
import type { TlsFiles } from "./security/tls.js";

/**
 * The service's configuration, read once from the environment at start-up.
 * Every variable is optional; a bad value stops the start with a message
 * that names it. The README's configuration table mirrors this file.
 */
export interface Config {
  /** DATABASE_URL: a postgres:// URL; unset means the embedded PostgreSQL. */
  readonly databaseUrl: string | undefined;
  /** HOST: interface to listen on. */
  readonly host: string;
  /** PORT: port to listen on (gRPC, Connect and gRPC-Web share it); 0 = any free port. */
  readonly port: number;
  /** EMBEDDED_PG_DIR: data folder of the embedded PostgreSQL. */
  readonly embeddedDataDir: string;
  /** EMBEDDED_PG_PORT: port of the embedded PostgreSQL; 0 = any free port. */
  readonly embeddedPort: number;
  /**
   * EMBEDDED_PG_STAGE_DIR: as root, where the PostgreSQL binaries and data go
   * when the postgres user cannot reach them where they are (a project under
   * /root, say).
   */
  readonly embeddedStageDir: string;
  /**
   * DATABASE_ROLE: the role the service acts as, with only what the rpcs and
   * jobs need (migration 0007); undefined ("none") = DATABASE_URL's user as it is.
   */
  readonly databaseRole: string | undefined;
  /** DATABASE_POOL_MAX: connections in the pool. */
  readonly poolMax: number;
  /** DATABASE_STATEMENT_TIMEOUT_MS: server-side cap on one statement; 0 = none. */
  readonly statementTimeoutMs: number;
  /** PAGE_TOKEN_SECRET: signs page tokens; unset = a secret kept in the database. */
  readonly pageTokenSecret: Uint8Array | undefined;
  /** SHUTDOWN_GRACE_MS: how long calls in flight may run on after SIGTERM. */
  readonly shutdownGraceMs: number;
  /** ROLLUP_INTERVAL_MS: how often to roll up closed days of usage; 0 = never in this process. */
  readonly rollupIntervalMs: number;
  /** WATCH_PROGRESS_INTERVAL_MS: how often an idle WatchKeys stream gets a PROGRESS marker. */
  readonly watchProgressIntervalMs: number;
  /** WATCH_MAX_QUEUED_CHANGES: how far a WatchKeys reader may fall behind before its stream ends. */
  readonly watchMaxQueuedChanges: number;
  /** WATCH_POLL_INTERVAL_MS: the feed's slow poll, behind the database's wake-ups. */
  readonly watchPollIntervalMs: number;
  /** KEY_EVENTS_RETENTION_DAYS: how long key changes are kept (feed history, audit trail); 0 = for ever. */
  readonly keyEventsRetentionDays: number;
  /**
   * WORKERS: processes serving the port. 0 = one per core. Unset: one per
   * core when NODE_ENV=production, else 1.
   */
  readonly workers: number;
  /** LOG_LEVEL: fatal, error, warn, info (default), debug (an access line per call), trace or silent. */
  readonly logLevel: string;
  /**
   * TLS_CERT_FILE and TLS_KEY_FILE: serve TLS (ALPN h2 and http/1.1) on the
   * port; TLS_CLIENT_CA_FILE: require client certificates from that CA
   * (mutual TLS). Unset: plaintext, which NODE_ENV=production refuses
   * unless ALLOW_PLAINTEXT=true.
   */
  readonly tls: TlsFiles | undefined;
  /** AUTH_POLICY_FILE: who may call which rpc (src/security/access.ts); needs TLS_CLIENT_CA_FILE. */
  readonly authPolicyFile: string | undefined;
  /** TLS_RELOAD_INTERVAL_MS: how often the TLS files and the policy are checked for a change. */
  readonly tlsReloadIntervalMs: number;
  /**
   * MAX_CONNECTIONS, MAX_CONCURRENT_STREAMS, MAX_CALLS_IN_FLIGHT, CONNECTION_IDLE_TIMEOUT_MS,
   * MAX_CONNECTION_AGE_MS, MAX_CONNECTION_AGE_GRACE_MS, KEEPALIVE_TIME_MS,
   * KEEPALIVE_TIMEOUT_MS (ConnectionLimits).
   */
  readonly connectionLimits: ConnectionLimits;
}

/**
 * A start-up problem the operator can fix (a bad setting, a taken port, a
 * database that is not ready): printed as one line that says what to do,
 * without a stack.
 */
export class StartError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "StartError";
  }
}

/** A configuration variable has a value the service cannot use. */
export class ConfigError extends StartError {
  constructor(variable: string, problem: string) {
    super(`${variable} ${problem}`);
    this.name = "ConfigError";
  }
}

type Env = Readonly<Record<string, string | undefined>>;

function integer(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  if (!/^\d+$/.test(raw) || Number(raw) < min || Number(raw) > max) {
    throw new ConfigError(name, `must be a whole number from ${min} to ${max}, got "${raw}"`);
  }
  return Number(raw);
}

/** The levels LOG_LEVEL may name (pino's, and "silent"). */
export const logLevels: readonly string[] = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];

function logLevel(env: Env): string {
  const raw = env.LOG_LEVEL;
  if (raw === undefined || raw === "") return "info";
  if (!logLevels.includes(raw))
    throw new ConfigError("LOG_LEVEL", `must be one of ${logLevels.join(", ")}, got "${raw}"`);
  return raw;
}

function databaseUrl(env: Env): string | undefined {
  const raw = env.DATABASE_URL;
  if (raw === undefined || raw === "") return undefined;
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new ConfigError("DATABASE_URL", "is not a URL (expected postgres://user@host:port/database)");
  }
  if (url.protocol !== "postgres:" && url.protocol !== "postgresql:") {
    throw new ConfigError("DATABASE_URL", `must start with postgres:// or postgresql://, got "${url.protocol}//"`);
  }
  return raw;
}

/** The role migration 0007 creates, with the service's privileges. */
export const serviceRole = "keys_driver_service";

function databaseRole(env: Env): string | undefined {
  const raw = env.DATABASE_ROLE;
  if (raw === undefined || raw === "") return serviceRole;
  if (raw === "none") return undefined;
  if (!/^[a-z_][a-z0-9_$]{0,62}$/.test(raw))
    throw new ConfigError("DATABASE_ROLE", `must be a role name in lower case (or "none"), got "${raw}"`);
  return raw;
}

function pageTokenSecret(env: Env): Uint8Array | undefined {
  const raw = env.PAGE_TOKEN_SECRET;
  if (raw === undefined || raw === "") return undefined;
  if (raw.length < 32) throw new ConfigError("PAGE_TOKEN_SECRET", "must be at least 32 characters");
  return new TextEncoder().encode(raw);
}

function workers(env: Env): number {
  const cores = os.availableParallelism();
  const n = integer(env, "WORKERS", env.NODE_ENV === "production" ? cores : 1, 0, 256);
  return n === 0 ? cores : n;
}

function tlsFiles(env: Env): TlsFiles | undefined {
  const certFile = env.TLS_CERT_FILE || undefined;
  const keyFile = env.TLS_KEY_FILE || undefined;
  const clientCaFile = env.TLS_CLIENT_CA_FILE || undefined;
  if (certFile && !keyFile)
    throw new ConfigError("TLS_KEY_FILE", "must be set with TLS_CERT_FILE (the certificate's key)");
  if (keyFile && !certFile) throw new ConfigError("TLS_CERT_FILE", "must be set with TLS_KEY_FILE");
  if (clientCaFile && !certFile)
    throw new ConfigError("TLS_CLIENT_CA_FILE", "needs TLS_CERT_FILE and TLS_KEY_FILE (mutual TLS is TLS)");
  if (env.AUTH_POLICY_FILE && !clientCaFile)
    throw new ConfigError(
      "AUTH_POLICY_FILE",
      "needs TLS_CLIENT_CA_FILE: callers are named by their client certificates",
    );
  const plaintextAllowed = env.ALLOW_PLAINTEXT ?? "";
  if (!["", "true", "false"].includes(plaintextAllowed))
    throw new ConfigError("ALLOW_PLAINTEXT", `must be true or false, got "${plaintextAllowed}"`);
  if (!certFile && env.NODE_ENV === "production" && plaintextAllowed !== "true") {
    throw new ConfigError(
      "TLS_CERT_FILE",
      "is required when NODE_ENV=production (with TLS_KEY_FILE, and TLS_CLIENT_CA_FILE for mutual TLS); set ALLOW_PLAINTEXT=true to serve without TLS on purpose",
    );
  }
  return certFile && keyFile ? { certFile, keyFile, clientCaFile } : undefined;
}

/**
 * How many connections, and for how long, so that no client can hold the
 * process's sockets or memory (the settings below, README).
 */
export interface ConnectionLimits {
  /** Connections open at once, every protocol together; more are closed as they arrive. */
  readonly maxConnections: number;
  /** Calls at once on one HTTP/2 (gRPC) connection; a client queues the rest. */
  readonly maxConcurrentStreams: number;
  /**
   * Unary calls of the service at once in this process, every connection
   * together; more are answered RESOURCE_EXHAUSTED at once (with RetryInfo)
   * rather than queued for the database. Health checks are never refused.
   */
  readonly maxCallsInFlight: number;
  /** An HTTP/2 connection with no call for this long is closed (GOAWAY; clients reconnect when needed). */
  readonly idleTimeoutMs: number;
  /** An HTTP/2 connection this old is asked to go away (load balancers rebalance); 0 = never. */
  readonly maxAgeMs: number;
  /** How long its calls may go on after that before they are cut (WatchKeys resumes from its cursor). */
  readonly maxAgeGraceMs: number;
  /** A ping after this long without traffic on an HTTP/2 connection; no answer within keepaliveTimeoutMs closes it. */
  readonly keepaliveTimeMs: number;
  readonly keepaliveTimeoutMs: number;
}

export const defaultConnectionLimits: ConnectionLimits = {
  maxConnections: 4096,
  maxConcurrentStreams: 1000,
  maxCallsInFlight: 256,
  idleTimeoutMs: 300_000,
  maxAgeMs: 0,
  maxAgeGraceMs: 60_000,
  keepaliveTimeMs: 30_000,
  keepaliveTimeoutMs: 10_000,
};

/** Parses and checks the environment. */
export function loadConfig(env: Env = process.env): Config {
  return Object.freeze({
    databaseUrl: databaseUrl(env),
    host: env.HOST || "127.0.0.1",
    port: integer(env, "PORT", 50051, 0, 65535),
    embeddedDataDir: env.EMBEDDED_PG_DIR || ".data/postgres",
    embeddedPort: integer(env, "EMBEDDED_PG_PORT", 0, 0, 65535),
    embeddedStageDir: env.EMBEDDED_PG_STAGE_DIR || "/var/lib/keys-driver-service",
    databaseRole: databaseRole(env),
    poolMax: integer(env, "DATABASE_POOL_MAX", 10, 1, 1000),
    statementTimeoutMs: integer(env, "DATABASE_STATEMENT_TIMEOUT_MS", 10_000, 0, 3_600_000),
    pageTokenSecret: pageTokenSecret(env),
    shutdownGraceMs: integer(env, "SHUTDOWN_GRACE_MS", 10_000, 0, 600_000),
    rollupIntervalMs: integer(env, "ROLLUP_INTERVAL_MS", 60_000, 0, 86_400_000),
    watchProgressIntervalMs: integer(env, "WATCH_PROGRESS_INTERVAL_MS", 15_000, 100, 3_600_000),
    watchMaxQueuedChanges: integer(env, "WATCH_MAX_QUEUED_CHANGES", 10_000, 1, 10_000_000),
    watchPollIntervalMs: integer(env, "WATCH_POLL_INTERVAL_MS", 5_000, 100, 3_600_000),
    keyEventsRetentionDays: integer(env, "KEY_EVENTS_RETENTION_DAYS", 90, 0, 36_500),
    workers: workers(env),
    logLevel: logLevel(env),
    tls: tlsFiles(env),
    authPolicyFile: env.AUTH_POLICY_FILE || undefined,
    tlsReloadIntervalMs: integer(env, "TLS_RELOAD_INTERVAL_MS", 10_000, 100, 86_400_000),
    connectionLimits: Object.freeze({
      maxConnections: integer(env, "MAX_CONNECTIONS", defaultConnectionLimits.maxConnections, 1, 1_000_000),
      maxConcurrentStreams: integer(
        env,
        "MAX_CONCURRENT_STREAMS",
        defaultConnectionLimits.maxConcurrentStreams,
        1,
        1_000_000,
      ),
      maxCallsInFlight: integer(env, "MAX_CALLS_IN_FLIGHT", defaultConnectionLimits.maxCallsInFlight, 1, 1_000_000),
      idleTimeoutMs: integer(
        env,
        "CONNECTION_IDLE_TIMEOUT_MS",
        defaultConnectionLimits.idleTimeoutMs,
        1000,
        86_400_000,
      ),
      maxAgeMs: integer(env, "MAX_CONNECTION_AGE_MS", defaultConnectionLimits.maxAgeMs, 0, 604_800_000),
      maxAgeGraceMs: integer(env, "MAX_CONNECTION_AGE_GRACE_MS", defaultConnectionLimits.maxAgeGraceMs, 0, 86_400_000),
      keepaliveTimeMs: integer(env, "KEEPALIVE_TIME_MS", defaultConnectionLimits.keepaliveTimeMs, 1000, 86_400_000),
      keepaliveTimeoutMs: integer(
        env,
        "KEEPALIVE_TIMEOUT_MS",
        defaultConnectionLimits.keepaliveTimeoutMs,
        1000,
        600_000,
      ),
    }),
  });
}

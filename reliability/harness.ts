// What the fault, overload and soak runs are made of: a PostgreSQL of their
// own (embedded, so that it can be stopped and started again), the service
// as the executable runs it, and traffic that keeps account of every write
// the service acknowledged.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { chmod, mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ErrorInfoSchema, RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { KeysDriverService, WatchMarker } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { loadConfig } from "../src/config.js";
import { createSql, type Sql } from "../src/db/client.js";
import { type EmbeddedPostgres, startEmbeddedPostgres } from "../src/process/embedded-postgres.js";
import { serviceNodeArgs } from "../src/process/node-args.js";
import { migrate } from "../src/schema/migrate.js";

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ database

/** A PostgreSQL the runs may stop, start and cut connections of. */
export interface FaultyDatabase {
  /** The `keys` database, as its superuser (the service acts as its own role on it). */
  readonly url: string;
  /** A pool for checks, as the superuser. */
  readonly admin: Sql;
  /** Stops the server (fast shutdown: connections cut), waits `downMs`, starts it again on the same port. */
  restart(downMs: number): Promise<void>;
  /** Terminates every backend of the service (its pool and its feed's listener); returns how many. */
  terminateService(): Promise<number>;
  close(): Promise<void>;
}

export async function startFaultyDatabase(): Promise<FaultyDatabase> {
  const folder = await mkdtemp(path.join(os.tmpdir(), "keys-reliability-"));
  // As root the server runs as the postgres user, who must reach the folder.
  await chmod(folder, 0o755);
  const options = {
    dataDir: path.join(folder, "pg"),
    port: 0,
    persistent: true,
    stageDir: loadConfig({}).embeddedStageDir,
    onNotice: () => {},
  };
  let server: EmbeddedPostgres = await startEmbeddedPostgres(options);
  const port = Number(new URL(server.url).port);
  const setup = createSql({ url: server.url, poolMax: 1, statementTimeoutMs: 0 });
  await setup`create database keys`;
  await setup.end();
  const url = server.urlFor("keys");
  const admin = createSql({ url, poolMax: 2, statementTimeoutMs: 0 });
  await migrate(admin);
  return {
    url,
    admin,
    async restart(downMs) {
      await server.stop();
      await sleep(downMs);
      server = await startEmbeddedPostgres({ ...options, port });
    },
    async terminateService() {
      const rows = await admin`
        select pg_terminate_backend(pid) as done
        from pg_stat_activity
        where application_name = 'keys-driver-service'
          and pid <> pg_backend_pid()
      `;
      return rows.filter((r) => r.done).length;
    },
    async close() {
      await admin.end({ timeout: 1 });
      await server.stop();
      await rm(folder, { recursive: true, force: true });
    },
  };
}

/** Tenants with keys, for the traffic to use. */
export interface Fixture {
  readonly tenants: readonly string[];
  readonly keys: readonly { readonly tenantId: string; readonly keyId: string }[];
}

/** Inserts `tenants` tenants of `keysEach` keys, and some usage for each key. */
export async function insertFixture(sql: Sql, tenants: number, keysEach: number): Promise<Fixture> {
  const tenantIds = Array.from({ length: tenants }, () => randomUUID());
  const keys = tenantIds.flatMap((tenantId) =>
    Array.from({ length: keysEach }, () => ({ tenantId, keyId: randomUUID() })),
  );
  for (const { tenantId, keyId } of keys) {
    await sql`
      insert into api_keys (tenant_id, id, name, key_prefix, key_hash)
      values (${tenantId}, ${keyId}, 'reliability', 'sk_rel_', sha256(${keyId}::text::bytea))
    `;
    await sql`
      insert into proxy_calls (tenant_id, api_key_id, cost_cents, created_at)
      select ${tenantId}, ${keyId}, 1.5, now() - i * interval '1 hour'
      from generate_series(1, 24) as i
    `;
  }
  return { tenants: tenantIds, keys };
}

// ------------------------------------------------------------------- service

/** The service, started as `npm start` starts it. */
export interface ServiceProcess {
  readonly child: ChildProcess;
  readonly address: string;
  /** Everything it has written (stdout and stderr). */
  output(): string;
  /** The pids of its worker processes (worker mode). */
  workers(): number[];
  /** The service's processes' resident memory, in bytes, summed. */
  rssBytes(): number;
  /** Sends `signal` and waits for the exit; resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

async function freePort(): Promise<number> {
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const { port } = probe.address() as net.AddressInfo;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  return port;
}

function childrenOf(pid: number): number[] {
  try {
    return execFileSync("pgrep", ["-P", String(pid)], { encoding: "utf8" })
      .split("\n")
      .filter(Boolean)
      .map(Number);
  } catch {
    return [];
  }
}

function rssOf(pid: number): number {
  try {
    const status = execFileSync("cat", [`/proc/${pid}/status`], { encoding: "utf8" });
    return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024;
  } catch {
    return 0;
  }
}

export async function startServiceProcess(env: Record<string, string>): Promise<ServiceProcess> {
  const port = await freePort();
  const child = spawn(process.execPath, [...serviceNodeArgs, "src/main.ts"], {
    env: { ...process.env, PORT: String(port), HOST: "127.0.0.1", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  const append = (d: Buffer) => {
    output += d;
    // Keep the last few megabytes: a soak logs for ten minutes.
    if (output.length > 8_000_000) output = output.slice(-4_000_000);
  };
  child.stdout?.on("data", append);
  child.stderr?.on("data", append);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the service did not start:\n${output}`)), 60_000);
    const check = setInterval(() => {
      if (/listening on/.test(output)) {
        clearInterval(check);
        clearTimeout(timer);
        resolve();
      }
    }, 20);
    child.once("exit", (code) => {
      clearInterval(check);
      clearTimeout(timer);
      reject(new Error(`the service exited with ${code}:\n${output}`));
    });
  });
  const pid = child.pid as number;
  return {
    child,
    address: `127.0.0.1:${port}`,
    output: () => output,
    workers: () => childrenOf(pid),
    rssBytes: () => [pid, ...childrenOf(pid)].reduce((sum, p) => sum + rssOf(p), 0),
    stop(signal = "SIGTERM") {
      return new Promise((resolve) => {
        if (child.exitCode !== null) return resolve(child.exitCode);
        child.once("exit", (code) => resolve(code));
        child.kill(signal);
      });
    },
  };
}

// ------------------------------------------------------------------- traffic

/** How a call ended: its code, and whether the server said so (a status with details) or only the transport. */
export interface Outcome {
  readonly code: string;
  readonly answered: boolean;
  /** The status carried a google.rpc.RetryInfo. */
  readonly retryInfo?: boolean;
  readonly startedAt: number;
  readonly endedAt: number;
}

/** connect-es's code names, as gRPC writes them. */
export const codeNames: Record<string, string> = {
  Canceled: "CANCELLED",
  Unknown: "UNKNOWN",
  InvalidArgument: "INVALID_ARGUMENT",
  DeadlineExceeded: "DEADLINE_EXCEEDED",
  NotFound: "NOT_FOUND",
  AlreadyExists: "ALREADY_EXISTS",
  PermissionDenied: "PERMISSION_DENIED",
  ResourceExhausted: "RESOURCE_EXHAUSTED",
  FailedPrecondition: "FAILED_PRECONDITION",
  Aborted: "ABORTED",
  OutOfRange: "OUT_OF_RANGE",
  Unimplemented: "UNIMPLEMENTED",
  Internal: "INTERNAL",
  Unavailable: "UNAVAILABLE",
  DataLoss: "DATA_LOSS",
  Unauthenticated: "UNAUTHENTICATED",
};

function outcomeOf(err: unknown, startedAt: number): Outcome {
  const error = ConnectError.from(err);
  // Every status this service sends carries an ErrorInfo; one without came from the client or the network.
  const answered = error.findDetails(ErrorInfoSchema).length > 0;
  const retryInfo = error.findDetails(RetryInfoSchema).length > 0;
  const code = Code[error.code] ?? String(error.code);
  return { code: codeNames[code] ?? code, answered, retryInfo, startedAt, endedAt: Date.now() };
}

/** One acknowledged write: its key, its kind and its unique reason. */
export interface Acknowledged {
  readonly tenantId: string;
  readonly keyId: string;
  readonly frozen: boolean;
  readonly reason: string;
  /** When its answer came. */
  readonly at: number;
  /**
   * False when the key was in that state already (a write whose answer was
   * lost had made it so): nothing to record, and the answer says so.
   */
  readonly changed: boolean;
}

/** Counts by code, and the facts the checks need. */
export class Ledger {
  readonly outcomes: Outcome[] = [];
  readonly acknowledged: Acknowledged[] = [];
  /** Every write tried, answered or not, by its reason: whether it froze. */
  readonly attempts = new Map<string, boolean>();
  /** Reasons of changes the watchers saw, per tenant. */
  readonly watched = new Map<string, Set<string>>();
  readonly crossTenant: string[] = [];
  /** Acknowledged freezes whose key was not frozen in the answer, and unfreezes likewise. */
  readonly wrongAnswers: string[] = [];
  watchResumes = 0;
  /** Why watch streams ended, by code, with when. */
  readonly watchEnds: string[] = [];
  watchRestartsFromScratch = 0;

  record(outcome: Outcome): void {
    this.outcomes.push(outcome);
  }

  /**
   * Calls by code that started within [from, to), e.g. while the database
   * was down: "UNAVAILABLE+retry" carried RetryInfo, "(transport)" is a
   * failure no server status explains (a connection cut).
   */
  codes(from = 0, to = Number.POSITIVE_INFINITY): Record<string, number> {
    const counts: Record<string, number> = {};
    for (const o of this.outcomes) {
      if (o.startedAt < from || o.startedAt >= to) continue;
      const key =
        o.code === "OK" ? "OK" : !o.answered ? `${o.code} (transport)` : o.retryInfo ? `${o.code}+retry` : o.code;
      counts[key] = (counts[key] ?? 0) + 1;
    }
    return counts;
  }

  /** When the first call started at or after `from` succeeded. */
  firstOkAfter(from: number): number | undefined {
    let first: number | undefined;
    for (const o of this.outcomes) {
      if (o.code === "OK" && o.startedAt >= from && (first === undefined || o.endedAt < first)) first = o.endedAt;
    }
    return first;
  }
}

export interface TrafficOptions {
  readonly writers: number;
  readonly readers: number;
  /** One watcher per tenant, for this many tenants. */
  readonly watchedTenants: number;
  /** Each call's deadline. */
  readonly deadlineMs: number;
}

/**
 * Writers freeze and unfreeze keys of their own (each key has one writer,
 * so the last acknowledged write is the key's state), readers read keys and
 * check the tenant of what comes back, and watchers follow tenants' changes,
 * resuming from their last cursor after any failure, as the README tells a
 * gateway to.
 */
export class Traffic {
  readonly ledger = new Ledger();
  private running = true;
  private readonly loops: Promise<void>[] = [];
  private readonly aborts = new Set<AbortController>();

  constructor(
    private readonly address: string,
    private readonly fixture: Fixture,
    private readonly options: TrafficOptions,
  ) {}

  private client() {
    return createClient(KeysDriverService, createGrpcTransport({ baseUrl: `http://${this.address}` }));
  }

  /** Starts the watchers, and once each stands at a position (its first message), the writers and readers. */
  async start(): Promise<this> {
    const ready: Promise<void>[] = [];
    for (const tenantId of this.fixture.tenants.slice(0, this.options.watchedTenants)) {
      this.ledger.watched.set(tenantId, new Set());
      let positioned: () => void = () => {};
      ready.push(new Promise<void>((resolve) => (positioned = resolve)));
      this.loops.push(this.watch(tenantId, positioned));
    }
    await Promise.all(ready);
    const keys = this.fixture.keys;
    for (let w = 0; w < this.options.writers; w++) {
      const own = keys.filter((_, i) => i % this.options.writers === w);
      this.loops.push(this.write(w, own));
    }
    for (let r = 0; r < this.options.readers; r++) this.loops.push(this.read(r));
    return this;
  }

  /** Stops sending; waits for the calls in flight and ends the watches. */
  async stop(): Promise<void> {
    this.running = false;
    for (const abort of this.aborts) abort.abort();
    await Promise.all(this.loops);
  }

  /** Stops the writers and readers, leaving the watchers to catch up. */
  private writing = true;
  stopWriting(): void {
    this.writing = false;
  }

  private async pause(err: unknown): Promise<void> {
    // A good client waits as RetryInfo says, or a little, before trying again.
    const error = ConnectError.from(err);
    await sleep(error.code === Code.Unavailable || error.code === Code.ResourceExhausted ? 100 : 20);
  }

  private async write(writer: number, keys: Fixture["keys"]): Promise<void> {
    const client = this.client();
    let seq = 0;
    const frozen = new Map<string, boolean>();
    while (this.running && this.writing) {
      const key = keys[seq % keys.length];
      if (!key) return;
      const freeze = !(frozen.get(key.keyId) ?? false);
      const reason = `w${writer}-${seq++}`;
      this.ledger.attempts.set(reason, freeze);
      const startedAt = Date.now();
      try {
        const request = { tenantId: key.tenantId, keyId: key.keyId, reason };
        const options = { timeoutMs: this.options.deadlineMs };
        const res = freeze
          ? await client.updateKeyFrozen(request, options)
          : await client.updateKeyUnfrozen(request, options);
        if (res.key?.tenantId !== key.tenantId) this.ledger.crossTenant.push(`write answered ${res.key?.tenantId}`);
        this.ledger.record({ code: "OK", answered: true, startedAt, endedAt: Date.now() });
        if (res.key?.isFrozen !== freeze)
          this.ledger.wrongAnswers.push(`${reason} answered is_frozen ${res.key?.isFrozen}`);
        this.ledger.acknowledged.push({ ...key, frozen: freeze, reason, at: Date.now(), changed: res.changed });
        frozen.set(key.keyId, freeze);
      } catch (err) {
        this.ledger.record(outcomeOf(err, startedAt));
        // The outcome is unknown: the next write of this key sets its state again.
        await this.pause(err);
      }
    }
  }

  private async read(reader: number): Promise<void> {
    const client = this.client();
    const keys = this.fixture.keys;
    let i = reader;
    while (this.running && this.writing) {
      i += 7;
      const key = keys[i % keys.length];
      if (!key) return;
      const startedAt = Date.now();
      try {
        const options = { timeoutMs: this.options.deadlineMs };
        if (i % 3 === 0) {
          const res = await client.fetchKeys({ tenantId: key.tenantId, pageSize: 20 }, options);
          for (const k of res.keys) {
            if (k.tenantId !== key.tenantId) this.ledger.crossTenant.push(`FetchKeys gave ${k.tenantId}`);
          }
        } else if (i % 3 === 1) {
          const res = await client.fetchKeyById({ tenantId: key.tenantId, keyId: key.keyId }, options);
          if (res.key?.tenantId !== key.tenantId)
            this.ledger.crossTenant.push(`FetchKeyById gave ${res.key?.tenantId}`);
        } else {
          const since = { seconds: BigInt(Math.floor(Date.now() / 1000) - 86_400 * 2), nanos: 0 };
          await client.fetchKeyUsage({ tenantId: key.tenantId, keyId: key.keyId, since }, options);
        }
        this.ledger.record({ code: "OK", answered: true, startedAt, endedAt: Date.now() });
      } catch (err) {
        this.ledger.record(outcomeOf(err, startedAt));
        await this.pause(err);
      }
    }
  }

  private async watch(tenantId: string, positioned: () => void): Promise<void> {
    const client = this.client();
    const seen = this.ledger.watched.get(tenantId) as Set<string>;
    let cursor = "";
    let backoffMs = 50;
    while (this.running) {
      const abort = new AbortController();
      this.aborts.add(abort);
      try {
        const request = cursor ? { tenantId, resumeCursor: cursor } : { tenantId };
        for await (const message of client.watchKeys(request, { signal: abort.signal })) {
          backoffMs = 50;
          cursor = message.cursor;
          positioned();
          const change = message.change;
          if (change) {
            if (change.key?.tenantId !== tenantId)
              this.ledger.crossTenant.push(`WatchKeys gave ${change.key?.tenantId}`);
            if (change.reason) seen.add(change.reason);
          } else if (message.marker === WatchMarker.UNSPECIFIED && !message.current) {
            this.ledger.crossTenant.push("WatchKeys sent an empty message");
          }
        }
      } catch (err) {
        if (!this.running) break;
        const error = ConnectError.from(err);
        this.ledger.watchEnds.push(`${Date.now()} ${tenantId.slice(0, 4)} ${Code[error.code]} ${error.rawMessage}`);
        if (error.code === Code.OutOfRange) {
          cursor = "";
          this.ledger.watchRestartsFromScratch++;
        }
        this.ledger.watchResumes++;
        await sleep(backoffMs);
        backoffMs = Math.min(backoffMs * 2, 1000);
      } finally {
        this.aborts.delete(abort);
      }
    }
  }
}

// -------------------------------------------------------------------- checks

/** What the database holds of the acknowledged writes. */
export interface WriteCheck {
  readonly acknowledged: number;
  /** Acknowledged writes with no change recorded in the database. */
  readonly lost: number;
  /** Keys whose state is not their last acknowledged write's. */
  readonly wrongState: number;
  /** Acknowledged writes the watchers of their tenant never saw. */
  readonly unseenByWatchers: number;
  /** A few of them, "reason@key". */
  readonly unseenExamples?: string[];
}

export async function checkWrites(sql: Sql, ledger: Ledger, settleMs = 3000): Promise<WriteCheck> {
  const recorded = new Set(
    (
      await sql`
        select key_id::text || '/' || reason as id
        from key_events
        where reason like 'w%'
      `
    ).map((r) => r.id as string),
  );
  const changes = ledger.acknowledged.filter((a) => a.changed);
  const lost = changes.filter((a) => !recorded.has(`${a.keyId}/${a.reason}`)).length;
  // A key's state is that of the last write the database recorded for it:
  // an acknowledged one, or one whose answer was lost on the way (a fault
  // between its commit and its reply), which is why every attempt is kept.
  const lastRecorded = await sql`
    select distinct on (e.key_id) e.key_id, e.reason, k.is_frozen
    from key_events as e
    join api_keys as k on k.tenant_id = e.tenant_id and k.id = e.key_id
    where e.reason like 'w%'
    order by e.key_id, e.position desc
  `;
  const wrongState = lastRecorded.filter((r) => ledger.attempts.get(r.reason as string) !== r.is_frozen).length;
  const deadline = Date.now() + settleMs;
  let unseen: Acknowledged[] = [];
  do {
    unseen = changes.filter((a) => {
      const seen = ledger.watched.get(a.tenantId);
      return seen !== undefined && !seen.has(a.reason);
    });
    if (unseen.length > 0) await sleep(100);
  } while (unseen.length > 0 && Date.now() < deadline);
  return {
    acknowledged: ledger.acknowledged.length,
    lost,
    wrongState,
    unseenByWatchers: unseen.length,
    unseenExamples: unseen.slice(0, 5).map((a) => `${a.reason}@${a.keyId} at ${a.at}`),
  };
}

/** The pids that logged a failed call after `since` (a character offset of the output). */
export function pidsThatServed(output: string, since: number): Set<number> {
  const pids = new Set<number>();
  for (const line of output.slice(since).split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      const entry = JSON.parse(line) as { pid?: number; msg?: string };
      if (entry.msg === "call failed" && entry.pid) pids.add(entry.pid);
    } catch {
      // A line cut by the output's trimming.
    }
  }
  return pids;
}

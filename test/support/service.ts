import { type ChildProcess, spawn } from "node:child_process";
import { serviceNodeArgs } from "../../src/process/node-args.js";
import { type RunningService, type ServiceConfig, type ServiceHooks, startService } from "../../src/service.js";
import { createTestDatabase, type TestDatabase } from "./database.js";
import { type FreezableProxy, startFreezableProxy } from "./proxy.js";

/**
 * The real service on a free port over the database at `databaseUrl`,
 * started as the executable starts it; failures are not logged.
 */
export async function startTestService(
  databaseUrl: string,
  settings: Partial<Omit<ServiceConfig, "databaseUrl">> = {},
  hooks: ServiceHooks = {},
): Promise<RunningService> {
  return await startService(
    {
      databaseUrl,
      host: "127.0.0.1",
      port: 0,
      // The tests connect as a superuser; the service acts as its own role, as in production.
      databaseRole: "keys_driver_service",
      poolMax: 10,
      statementTimeoutMs: 30_000,
      pageTokenSecret: undefined,
      watchProgressIntervalMs: 15_000,
      watchMaxQueuedChanges: 10_000,
      watchPollIntervalMs: 5_000,
      logLevel: "silent",
      ...settings,
    },
    { logError: () => {}, ...hooks },
  );
}

/** What a suite that calls the real service works with. */
export interface ServiceUnderTest {
  readonly db: TestDatabase;
  readonly server: RunningService;
}

/**
 * Registers mocha hooks that give the calling suite a fresh database and the
 * real service on it, torn down after the suite; read the fields in tests.
 */
export function useTestService(settings: Partial<Omit<ServiceConfig, "databaseUrl">> = {}): ServiceUnderTest {
  const state = {} as { db: TestDatabase; server: RunningService };
  before(async () => {
    state.db = await createTestDatabase();
    state.server = await startTestService(state.db.url, settings);
  });
  after(async () => {
    await state.server?.close(1000);
    await state.db?.drop();
  });
  return {
    get db() {
      return state.db;
    },
    get server() {
      return state.server;
    },
  };
}

/** A suite's service whose database connections pass through a proxy the test can freeze. */
export interface FrozenDatabaseUnderTest {
  readonly db: TestDatabase;
  readonly proxy: FreezableProxy;
  readonly service: RunningService;
}

/**
 * Registers mocha hooks that give the calling suite a fresh database and the
 * real service on it, reaching it through startFreezableProxy (to stop the
 * database as SIGSTOP would, without touching the server others share).
 */
export function useServiceBehindFreezableProxy(): FrozenDatabaseUnderTest {
  const state = {} as { db: TestDatabase; proxy: FreezableProxy; service: RunningService };
  before(async () => {
    state.db = await createTestDatabase();
    const url = new URL(state.db.url);
    state.proxy = await startFreezableProxy(`${url.hostname}:${url.port}`);
    url.host = state.proxy.address;
    state.service = await startTestService(url.toString(), { pageTokenSecret: new Uint8Array(32) });
  });
  after(async () => {
    state.proxy?.resume();
    await state.service?.close(1000);
    await state.proxy?.close();
    await state.db?.drop();
  });
  return state;
}

/** `npm start`'s process, as a test started it (startMain). */
export interface Started {
  readonly child: ChildProcess;
  readonly exited: Promise<number | null>;
  output(): string;
  /** Resolves with the port once the service says it listens; rejects if it exits first. */
  readonly listening: Promise<number>;
}

/**
 * `src/main.ts` in a process of its own, as `npm start` runs it, on a free
 * port with no rollup runs; `env` on top of this process's environment
 * without its DATABASE_URL (unset: the embedded PostgreSQL).
 */
export function startMain(env: Record<string, string>): Started {
  const { DATABASE_URL: _ignored, ...inherited } = process.env;
  const child = spawn(process.execPath, [...serviceNodeArgs, "src/main.ts"], {
    env: { ...inherited, PORT: "0", ROLLUP_INTERVAL_MS: "0", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  const listening = new Promise<number>((resolve, reject) => {
    const onData = (d: Buffer) => {
      output += d;
      const m = /listening on [\d.]+:(\d+)/.exec(output);
      if (m) resolve(Number(m[1]));
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    exited.then((code) => reject(new Error(`the service exited (${code}) before listening:\n${output}`)));
  });
  listening.catch(() => {});
  return { child, exited, listening, output: () => output };
}

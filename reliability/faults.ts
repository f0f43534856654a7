// Faults under load, with nothing lost: the service's database connections
// cut, PostgreSQL restarted, a worker killed, and SIGTERM, while writers,
// readers and watchers run; then every acknowledged write is looked for in
// the database and in what the watchers saw.
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import {
  checkWrites,
  type FaultyDatabase,
  type Fixture,
  insertFixture,
  pidsThatServed,
  type ServiceProcess,
  sleep,
  startFaultyDatabase,
  startServiceProcess,
  Traffic,
  type WriteCheck,
} from "./harness.js";

/** One fault and what the callers saw. */
export interface FaultOutcome {
  readonly fault: string;
  readonly expected: string;
  /** Calls by code that started during the fault's window. */
  readonly codes: Record<string, number>;
  /** From the end of the fault to the first call answered OK. */
  readonly recoveredMs?: number;
  readonly facts: Record<string, number | string | boolean>;
  readonly ok: boolean;
}

export interface FaultReport {
  readonly outcomes: FaultOutcome[];
  readonly writes: WriteCheck;
  readonly crossTenant: number;
  /** Acknowledged writes whose answer showed the key in another state than asked. */
  readonly wrongAnswers: number;
  readonly watchResumes: number;
  readonly watchEnds: string[];
  readonly calls: number;
  readonly postgresVersion: string;
}

/** The service's settings in these runs: worker mode, so that a worker can be killed. */
export const serviceEnv = (db: FaultyDatabase): Record<string, string> => ({
  DATABASE_URL: db.url,
  WORKERS: "2",
  ROLLUP_INTERVAL_MS: "0",
  LOG_LEVEL: "info",
  SHUTDOWN_GRACE_MS: "10000",
  WATCH_PROGRESS_INTERVAL_MS: "1000",
  WATCH_POLL_INTERVAL_MS: "1000",
});

export const trafficOptions = { writers: 8, readers: 4, watchedTenants: 6, deadlineMs: 3000 };

/** A window of `ms` after `from`, while traffic runs: the calls by code. */
async function windowOf(traffic: Traffic, ms: number, work: () => Promise<unknown>) {
  const from = Date.now();
  await work();
  const faultEnded = Date.now();
  await sleep(ms);
  const firstOk = traffic.ledger.firstOkAfter(faultEnded);
  return {
    codes: traffic.ledger.codes(from, Date.now()),
    recoveredMs: firstOk === undefined ? undefined : Math.max(0, firstOk - faultEnded),
  };
}

/** Kills one worker and shows that its replacement serves its share of new connections. */
async function killWorker(
  service: ServiceProcess,
  fixture: Fixture,
): Promise<Record<string, number | string | boolean>> {
  const [victim, survivor] = service.workers();
  if (victim === undefined || survivor === undefined) throw new Error("worker mode has no two workers");
  process.kill(victim, "SIGKILL");
  const deadline = Date.now() + 30_000;
  let replacement: number | undefined;
  while (Date.now() < deadline && replacement === undefined) {
    await sleep(100);
    replacement = service.workers().find((pid) => pid !== victim && pid !== survivor);
  }
  if (replacement === undefined) return { replaced: false };
  await sleep(1000);
  // New connections, one call each that the service logs (NOT_FOUND, at info), with the pid that served it.
  const mark = service.output().length;
  const key = fixture.keys[0];
  for (let i = 0; i < 24; i++) {
    const client = createClient(KeysDriverService, createGrpcTransport({ baseUrl: `http://${service.address}` }));
    await client
      .fetchKeyById({ tenantId: key?.tenantId ?? "", keyId: "00000000-0000-4000-8000-000000000000" })
      .catch(() => {});
  }
  await sleep(200);
  const served = pidsThatServed(service.output(), mark);
  return {
    replaced: true,
    replacementServed: served.has(replacement),
    survivorServed: served.has(survivor),
    processesServing: served.size,
  };
}

export async function runFaults(log: (line: string) => void = () => {}): Promise<FaultReport> {
  const db = await startFaultyDatabase();
  let service: ServiceProcess | undefined;
  try {
    const fixture = await insertFixture(db.admin, 6, 16);
    const [version] = await db.admin`show server_version`;
    service = await startServiceProcess(serviceEnv(db));
    const traffic = await new Traffic(service.address, fixture, trafficOptions).start();
    await sleep(3000);
    const outcomes: FaultOutcome[] = [];

    log("faults: terminating the service's database backends ...");
    let terminated = 0;
    const cut = await windowOf(traffic, 3000, async () => {
      terminated = await db.terminateService();
    });
    outcomes.push({
      fault: "pool and listener backends terminated (pg_terminate_backend)",
      expected: "calls on a cut connection fail UNAVAILABLE and are retried; the pool and the feed reconnect",
      ...cut,
      facts: { backendsTerminated: terminated },
      ok: terminated > 0 && cut.recoveredMs !== undefined,
    });

    log("faults: restarting PostgreSQL (3 s down) ...");
    const restart = await windowOf(traffic, 5000, () => db.restart(3000));
    const unavailable = Object.entries(restart.codes)
      .filter(([code]) => code.startsWith("UNAVAILABLE"))
      .reduce((n, [, count]) => n + count, 0);
    const withRetry = restart.codes["UNAVAILABLE+retry"] ?? 0;
    outcomes.push({
      fault: "PostgreSQL restarted under load (down 3 s)",
      expected: "UNAVAILABLE with RetryInfo while it is down; recovery without a restart of the service",
      ...restart,
      facts: { unavailable, unavailableWithRetryInfo: withRetry },
      ok: restart.recoveredMs !== undefined && unavailable > 0 && withRetry > 0,
    });

    log("faults: killing a worker ...");
    let workerFacts: Record<string, number | string | boolean> = {};
    const killed = await windowOf(traffic, 2000, async () => {
      workerFacts = await killWorker(service as ServiceProcess, fixture);
    });
    outcomes.push({
      fault: "a worker killed (SIGKILL)",
      expected: "replaced by the primary; the replacement takes its share of new connections",
      ...killed,
      facts: workerFacts,
      ok: workerFacts.replacementServed === true && workerFacts.survivorServed === true,
    });

    traffic.stopWriting();
    const writes = await checkWrites(db.admin, traffic.ledger, 10_000);
    await traffic.stop();

    log("faults: SIGTERM under load ...");
    const closing = await new Traffic(service.address, fixture, { ...trafficOptions, watchedTenants: 0 }).start();
    await sleep(2000);
    const signalled = Date.now();
    const exitCode = await service.stop("SIGTERM");
    const stopMs = Date.now() - signalled;
    await closing.stop();
    const inFlight = closing.ledger.outcomes.filter((o) => o.startedAt < signalled && o.endedAt >= signalled);
    const unanswered = inFlight.filter((o) => o.code !== "OK" && !o.answered).length;
    const afterStop = await checkWrites(db.admin, closing.ledger, 0);
    outcomes.push({
      fault: "SIGTERM under load",
      expected: "every call in flight answered; exit 0 within the grace period; nothing acknowledged lost",
      codes: closing.ledger.codes(signalled - 50, signalled + stopMs),
      facts: {
        callsInFlight: inFlight.length,
        unanswered,
        exitCode: exitCode ?? "signal",
        stopMs,
        lost: afterStop.lost,
      },
      ok: unanswered === 0 && exitCode === 0 && afterStop.lost === 0 && afterStop.wrongState === 0,
    });

    return {
      outcomes,
      writes: {
        acknowledged: writes.acknowledged + afterStop.acknowledged,
        lost: writes.lost + afterStop.lost,
        wrongState: Math.max(writes.wrongState, afterStop.wrongState),
        unseenByWatchers: writes.unseenByWatchers,
        unseenExamples: writes.unseenExamples,
      },
      crossTenant: traffic.ledger.crossTenant.length + closing.ledger.crossTenant.length,
      wrongAnswers: traffic.ledger.wrongAnswers.length + closing.ledger.wrongAnswers.length,
      watchResumes: traffic.ledger.watchResumes,
      watchEnds: traffic.ledger.watchEnds,
      calls: traffic.ledger.outcomes.length + closing.ledger.outcomes.length,
      postgresVersion: String(version?.server_version ?? ""),
    };
  } finally {
    await service?.stop("SIGKILL");
    await db.close();
  }
}

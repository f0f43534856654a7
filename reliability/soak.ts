// The soak: writers, readers and watchers for ten minutes (by default),
// with a fault every 100 seconds in turn (the service's database backends
// cut, PostgreSQL restarted, a worker killed), and the service's memory
// sampled all along. At the end, nothing acknowledged may be missing, no
// tenant may have seen another's row, and memory may not have grown.
import { serviceEnv, trafficOptions } from "./faults.js";
import {
  checkWrites,
  insertFixture,
  type ServiceProcess,
  sleep,
  startFaultyDatabase,
  startServiceProcess,
  Traffic,
  type WriteCheck,
} from "./harness.js";

export interface SoakReport {
  readonly seconds: number;
  readonly calls: number;
  readonly codes: Record<string, number>;
  readonly faults: string[];
  readonly writes: WriteCheck;
  readonly crossTenant: number;
  /** The service's processes' memory (resident, summed), a sample every 10 s, in MB. */
  readonly rssMb: number[];
  /** The last minute's average memory over the second minute's (the first is warm-up). */
  readonly memoryGrowth: number;
  readonly ok: boolean;
}

const faultEveryMs = 100_000;

export async function runSoak(seconds: number, log: (line: string) => void = () => {}): Promise<SoakReport> {
  const db = await startFaultyDatabase();
  let service: ServiceProcess | undefined;
  try {
    const fixture = await insertFixture(db.admin, 6, 16);
    service = await startServiceProcess(serviceEnv(db));
    const running = service;
    const traffic = await new Traffic(service.address, fixture, trafficOptions).start();
    const faults: (() => Promise<string>)[] = [
      async () => `backends terminated: ${await db.terminateService()}`,
      async () => {
        await db.restart(2000);
        return "PostgreSQL restarted (2 s down)";
      },
      async () => {
        const [victim] = running.workers();
        if (victim !== undefined) process.kill(victim, "SIGKILL");
        return `worker ${victim} killed`;
      },
    ];
    const rssMb: number[] = [];
    const injected: string[] = [];
    const started = Date.now();
    let nextFault = started + faultEveryMs;
    let nextSample = started;
    while (Date.now() - started < seconds * 1000) {
      if (Date.now() >= nextSample) {
        rssMb.push(Math.round(running.rssBytes() / 1e6));
        nextSample += 10_000;
      }
      if (Date.now() >= nextFault) {
        const fault = faults[injected.length % faults.length];
        if (fault) {
          const what = await fault();
          injected.push(`${Math.round((Date.now() - started) / 1000)} s: ${what}`);
          log(`soak: ${injected.at(-1)}`);
        }
        nextFault += faultEveryMs;
      }
      await sleep(1000);
    }
    traffic.stopWriting();
    const writes = await checkWrites(db.admin, traffic.ledger, 15_000);
    await traffic.stop();
    const average = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
    const memoryGrowth = average(rssMb.slice(-6)) / average(rssMb.slice(6, 12));
    const crossTenant = traffic.ledger.crossTenant.length + traffic.ledger.wrongAnswers.length;
    return {
      seconds,
      calls: traffic.ledger.outcomes.length,
      codes: traffic.ledger.codes(),
      faults: injected,
      writes,
      crossTenant,
      rssMb,
      memoryGrowth,
      ok:
        writes.lost === 0 &&
        writes.wrongState === 0 &&
        writes.unseenByWatchers === 0 &&
        crossTenant === 0 &&
        memoryGrowth < 1.2,
    };
  } finally {
    await service?.stop("SIGKILL");
    await db.close();
  }
}

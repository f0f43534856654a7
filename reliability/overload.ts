// Overload: the service driven at ten times the load it can sustain, by
// callers that do not wait for each other (an open loop), then at half of
// it again. Past MAX_CALLS_IN_FLIGHT a call is refused at once
// (RESOURCE_EXHAUSTED with RetryInfo), so the calls it accepts keep a
// bounded latency, and it recovers as soon as the load drops.

import { randomUUID } from "node:crypto";
import type { LoadPlan, LoadResult } from "../bench/load.js";
import { runLoad } from "../bench/measure.js";
import { frame } from "../bench/scenarios.js";
import { CountKeysRequestSchema } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { type ServiceProcess, startFaultyDatabase, startServiceProcess } from "./harness.js";

const keysCounted = 100_000;

/** One phase of the run. */
export interface OverloadPhase {
  readonly phase: string;
  /** Calls started a second (open loop), or undefined for the closed-loop measure. */
  readonly arrivalsPerSecond?: number;
  readonly result: LoadResult;
  /** The service's resident memory at the end of the phase, in MB. */
  readonly rssMb: number;
}

export interface OverloadReport {
  readonly rpc: string;
  readonly maxCallsInFlight: number;
  /** What the service completes a second when kept busy: the sustainable load. */
  readonly sustainablePerSecond: number;
  readonly phases: OverloadPhase[];
}

/** Runs the phases on a service with MAX_CALLS_IN_FLIGHT = `maxCallsInFlight`. */
export async function runOverload(
  maxCallsInFlight: number,
  log: (line: string) => void = () => {},
): Promise<OverloadReport> {
  const db = await startFaultyDatabase();
  let service: ServiceProcess | undefined;
  try {
    // One tenant of many keys: counting them is work for the database, and the answer is small.
    const tenantId = randomUUID();
    await db.admin`
      insert into api_keys (tenant_id, id, name, key_prefix, key_hash)
      select ${tenantId}, gen_random_uuid(), 'overload', 'sk_over_', sha256(i::text::bytea)
      from generate_series(1, ${keysCounted}) as i
    `;
    await db.admin`vacuum analyze api_keys`;
    service = await startServiceProcess({
      DATABASE_URL: db.url,
      WORKERS: "1",
      ROLLUP_INTERVAL_MS: "0",
      LOG_LEVEL: "warn",
      MAX_CALLS_IN_FLIGHT: String(maxCallsInFlight),
    });
    const calls = [
      { path: "/keysdriver.v1.KeysDriverService/CountKeys", frame: frame(CountKeysRequestSchema, { tenantId }) },
    ];
    const plan = (durationMs: number, arrivalsPerSecond?: number): LoadPlan => ({
      address: service?.address ?? "",
      calls,
      connections: 4,
      concurrency: 32,
      warmupMs: 2000,
      durationMs,
      bucketMs: 1000,
      arrivalsPerSecond,
      // As an HTTP/2 client must: no more streams open than the server allows (1000 a connection).
      maxOutstanding: 4 * 1000 - 100,
    });
    const phases: OverloadPhase[] = [];
    const run = async (phase: string, durationMs: number, arrivalsPerSecond?: number) => {
      log(`overload: ${phase} ...`);
      const result = await runLoad(plan(durationMs, arrivalsPerSecond)).catch((err: Error) => {
        const said = (service?.output() ?? "")
          .split("\n")
          .filter((line) => !line.includes('"call failed"') && !line.includes("node:internal"));
        throw new Error(`${err.message}; the service wrote:\n${said.slice(-40).join("\n")}`);
      });
      phases.push({ phase, arrivalsPerSecond, result, rssMb: Math.round((service?.rssBytes() ?? 0) / 1e6) });
      return result;
    };
    const busy = await run("kept busy (32 calls in flight): the sustainable load", 6000);
    const sustainable = Math.round(busy.callsPerSecond);
    await run("half the sustainable load", 8000, Math.round(sustainable / 2));
    await run("ten times the sustainable load", 10_000, sustainable * 10);
    await run("half the sustainable load again", 8000, Math.round(sustainable / 2));
    return {
      rpc: `CountKeys (a tenant of ${keysCounted.toLocaleString("en")} keys)`,
      maxCallsInFlight,
      sustainablePerSecond: sustainable,
      phases,
    };
  } finally {
    await service?.stop("SIGKILL");
    await db.close();
  }
}

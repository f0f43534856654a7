// The benchmark's WatchKeys measurements: freeze-to-event latency seen by
// watchers in another process, changes fanned out per second by one service
// process, memory per idle stream, and freeze throughput with the feed
// against without it.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import readline from "node:readline";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { arrayLiteral, type Sql } from "../src/db/client.js";
import {
  hasPgbench,
  type Measured,
  measureServer,
  median,
  runPgbench,
  type ServerProcess,
  type Settings,
} from "./measure.js";
import type { Fixtures, Scenario } from "./scenarios.js";
import type { WatchersPlan, WatchersResult } from "./watchers.js";

/** What the WatchKeys measurements found. */
export interface WatchResults {
  readonly latency: {
    readonly watchers: number;
    readonly freezes: number;
    readonly p50Ms: number;
    readonly p99Ms: number;
    readonly maxMs: number;
    readonly missing: number;
    /** The two parts of the latency: call sent to its commit, and commit to arrival. */
    readonly toCommit: { readonly p50Ms: number; readonly p99Ms: number };
    readonly toArrival: { readonly p50Ms: number; readonly p99Ms: number };
  };
  readonly fanOut: {
    readonly watchers: number;
    readonly changes: number;
    readonly missing: number;
    readonly changesPerSecond: number;
    readonly deliveriesPerSecond: number;
    /** Streams ended by the server (fallen behind) and resumed from their cursor. */
    readonly resumes: number;
  };
  readonly idleStreams: { readonly streams: number; readonly bytesPerStream: number };
  readonly freezeThroughput: {
    readonly withFeed: Measured;
    readonly withoutFeed: Measured;
    /** Events captured (triggers on), nobody watching: the database's share of the cost. */
    readonly capturedOnly: Measured;
    readonly ratio: number;
    /** The watchers process's CPU during the runs with the feed, in cores (it shares the machine). */
    readonly watchersCores: number;
  };
  /** pgbench, 10 clients, one key change per transaction, in each way of writing it. */
  readonly writerCost?: readonly { readonly way: string; readonly measured: Measured }[];
}

const now = () => performance.timeOrigin + performance.now();

/** A watchers process with `plan`'s streams open; resolves once every stream has sent its first message. */
async function openWatchers(plan: WatchersPlan) {
  const child = spawn(process.execPath, ["--import", "./src/preload.js", "bench/watchers.ts"], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const lines = readline.createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  child.stdin.write(`${JSON.stringify(plan)}\n`);
  const ready = await lines.next();
  if (ready.value !== "ready") throw new Error(`watchers did not start: ${String(ready.value)}`);
  return {
    /** CPU seconds the watchers process has used so far. */
    cpuSeconds: () => cpuSeconds(child.pid as number),
    /** Resolves when the watchers say every expected change has arrived, or after `ms`. */
    async allArrived(ms: number): Promise<void> {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        lines.next(),
        new Promise((resolve) => {
          timer = setTimeout(resolve, ms);
        }),
      ]);
      clearTimeout(timer);
    },
    async stop(): Promise<WatchersResult> {
      child.stdin.end("stop\n");
      const result = await lines.next();
      return JSON.parse(result.value as string) as WatchersResult;
    },
  };
}

/** CPU seconds (user and system) a process has used, from /proc (clock ticks of 1/100 s). */
function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.split(" ") ?? [];
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? Number.NaN) * 1024;
}

const percentile = (sorted: number[], p: number) =>
  sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? Number.NaN;

/**
 * 100 watchers in another process (half on the tenant, half on every
 * tenant); freezes and unfreezes through the service, 50 a second; each
 * change's arrival at each watcher against the moment its call was sent.
 */
async function freezeToEventLatency(
  ours: ServerProcess,
  sql: Sql,
  keys: { tenant_id: string; key_id: string }[],
  seconds: number,
) {
  const tenantId = keys[0]?.tenant_id ?? "";
  const mine = keys.filter((k) => k.tenant_id === tenantId).slice(0, 200);
  // Unfrozen to begin with, so that every call below changes its key.
  await sql`
    update api_keys set is_frozen = false, frozen_at = null
    where tenant_id = ${tenantId} and id = any(${arrayLiteral(mine.map((k) => k.key_id))}::uuid[])
  `;
  const watchers = 100;
  const streams = Array.from({ length: watchers }, (_, i) =>
    i % 2 === 0 ? { tenantId } : { allTenants: true as const },
  );
  const open = await openWatchers({ address: ours.address, streams, record: true });
  const client = createClient(KeysDriverService, createGrpcTransport({ baseUrl: `http://${ours.address}` }));
  const sent = new Map<string, number>();
  const total = seconds * 50;
  for (let i = 0; i < total; i++) {
    const key = mine[i % mine.length] as { key_id: string };
    const at = now();
    const call = Math.floor(i / mine.length) % 2 === 0 ? client.updateKeyFrozen : client.updateKeyUnfrozen;
    const res = await call({ tenantId, keyId: key.key_id });
    if (res.changed && res.key) sent.set(`${res.key.id} ${res.key.etag.split(".")[0]}`, at);
    const wait = at + 20 - now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
  await new Promise((r) => setTimeout(r, 1000));
  const result = await open.stop();
  const latencies: number[] = [];
  const toCommit: number[] = [];
  const toArrival: number[] = [];
  for (const [id, version, at, committedAt] of result.receipts) {
    const started = sent.get(`${id} ${version}`);
    if (started === undefined) continue;
    latencies.push(at - started);
    toCommit.push(committedAt - started);
    toArrival.push(at - committedAt);
  }
  for (const list of [latencies, toCommit, toArrival]) list.sort((a, b) => a - b);
  const parts = (sorted: number[]) => ({ p50Ms: percentile(sorted, 0.5), p99Ms: percentile(sorted, 0.99) });
  return {
    watchers,
    freezes: sent.size,
    p50Ms: percentile(latencies, 0.5),
    p99Ms: percentile(latencies, 0.99),
    maxMs: latencies.at(-1) ?? Number.NaN,
    missing: sent.size * watchers - latencies.length,
    toCommit: parts(toCommit),
    toArrival: parts(toArrival),
  };
}

/** 10 all-tenant watchers; 20,000 changes committed in large batches; how fast they reach the watchers. */
async function fanOut(ours: ServerProcess, sql: Sql, tenantId: string) {
  const watchers = 10;
  const changes = 20_000;
  const keys = await sql<{ id: string }[]>`select id from api_keys where tenant_id = ${tenantId} limit 2000`;
  const perWatcher = Math.ceil(changes / keys.length) * keys.length;
  const open = await openWatchers({
    address: ours.address,
    streams: Array.from({ length: watchers }, () => ({ allTenants: true as const })),
    record: false,
    expectChanges: watchers * perWatcher,
  });
  for (let done = 0; done < changes; done += keys.length) {
    await sql`
      update api_keys set name = 'fan-out ' || ${done}::text
      where tenant_id = ${tenantId} and id = any(${arrayLiteral(keys.map((k) => k.id))}::uuid[])
    `;
  }
  // The rate is taken from the first and the last arrival, not from this wait.
  await open.allArrived(120_000);
  const result = await open.stop();
  const seconds = (result.lastAt - result.firstAt) / 1000;
  return {
    watchers,
    changes: perWatcher,
    missing: watchers * perWatcher - result.changes,
    changesPerSecond: result.changes / watchers / seconds,
    deliveriesPerSecond: result.changes / seconds,
    resumes: result.resumes,
  };
}

/** The service's resident memory before and after 1,000 idle streams, per stream. */
async function idleStreams(ours: ServerProcess, tenants: string[]) {
  const pid = ours.child.pid as number;
  await new Promise((r) => setTimeout(r, 2000));
  const before = rssBytes(pid);
  const streams = 1000;
  const open = await openWatchers({
    address: ours.address,
    streams: Array.from({ length: streams }, (_, i) => ({ tenantId: tenants[i % tenants.length] as string })),
    record: false,
  });
  await new Promise((r) => setTimeout(r, 3000));
  const after = rssBytes(pid);
  await open.stop();
  return { streams, bytesPerStream: (after - before) / streams };
}

/**
 * UpdateKeyFrozen/Unfrozen load with the feed (its triggers on, 100 watchers
 * connected, one of them on every tenant, as a gateway), with the events
 * captured but nobody watching, and without the feed (the event triggers
 * disabled, nobody watching), alternating, 3 rounds each.
 * The service's wake-up statement after each freeze runs in both: its cost
 * is measured apart, by writerCost.
 */
async function freezeThroughput(
  settings: Settings,
  ours: ServerProcess,
  sql: Sql,
  freezes: Scenario,
  tenants: string[],
) {
  const withFeed: Measured[] = [];
  const withoutFeed: Measured[] = [];
  const capturedOnly: Measured[] = [];
  const watchersCores: number[] = [];
  for (let round = 0; round < 3; round++) {
    await sql`alter table api_keys enable trigger api_keys_record_update`;
    const open = await openWatchers({
      address: ours.address,
      streams: [
        { allTenants: true },
        ...Array.from({ length: 99 }, (_, i) => ({ tenantId: tenants[i % tenants.length] as string })),
      ],
      record: false,
    });
    const cpuBefore = open.cpuSeconds();
    const startedAt = now();
    withFeed.push((await measureServer(settings, ours, freezes.calls)).measured);
    watchersCores.push((open.cpuSeconds() - cpuBefore) / ((now() - startedAt) / 1000));
    await open.stop();
    capturedOnly.push((await measureServer(settings, ours, freezes.calls)).measured);
    await sql`alter table api_keys disable trigger api_keys_record_update`;
    try {
      withoutFeed.push((await measureServer(settings, ours, freezes.calls)).measured);
    } finally {
      await sql`alter table api_keys enable trigger api_keys_record_update`;
    }
  }
  const w = median(withFeed);
  const wo = median(withoutFeed);
  return {
    withFeed: w,
    withoutFeed: wo,
    capturedOnly: median(capturedOnly),
    ratio: w.callsPerSecond / wo.callsPerSecond,
    watchersCores: watchersCores.sort((a, b) => a - b)[1] ?? Number.NaN,
  };
}

/**
 * What capturing a change and waking the readers costs a writer, measured
 * with pgbench on a change of a key's name: without the event trigger; with
 * it, as this service writes (no NOTIFY in the transaction), then with the
 * service's wake-up statement after it; and as any other writer (the
 * trigger's NOTIFY in the transaction, whose commits PostgreSQL serialises).
 */
async function writerCost(
  settings: Settings,
  sql: Sql,
  url: string,
  keys: readonly { tenant_id: string; key_id: string }[],
) {
  if (!hasPgbench()) return undefined;
  await sql`drop table if exists bench.pgbench_keys`;
  await sql`create table bench.pgbench_keys (n int primary key, tenant_id uuid, key_id uuid)`;
  for (const [n, k] of keys.entries()) {
    await sql`insert into bench.pgbench_keys values (${n + 1}, ${k.tenant_id}, ${k.key_id})`;
  }
  const pick = `\\set i random(1, ${keys.length})\nselect tenant_id, key_id from bench.pgbench_keys where n = :i \\gset\n`;
  const change = "update api_keys set name = md5(random()::text) where tenant_id = :tenant_id and id = :key_id;\n";
  const service = { PGAPPNAME: "keys-driver-service" };
  const ways = [
    { way: "no event trigger", script: change, env: service, trigger: false },
    { way: "event, no NOTIFY", script: change, env: service, trigger: true },
    {
      way: "event, then a wake-up statement each (the service coalesces them)",
      script: `${change}select set_config('synchronous_commit', 'off', true), pg_notify('key_events', '');\n`,
      env: service,
      trigger: true,
    },
    { way: "event with NOTIFY in the transaction (other writers)", script: change, env: {}, trigger: true },
  ];
  const results: { way: string; measured: Measured }[] = [];
  try {
    for (const w of ways) {
      if (!w.trigger) await sql`alter table api_keys disable trigger api_keys_record_update`;
      try {
        results.push({ way: w.way, measured: await runPgbench(settings, url, pick + w.script, w.env) });
      } finally {
        await sql`alter table api_keys enable trigger api_keys_record_update`;
      }
    }
  } finally {
    await sql`drop table if exists bench.pgbench_keys`;
  }
  return results;
}

/** Every WatchKeys measurement, against the running service `ours`. */
export async function measureWatch(
  settings: Settings,
  ours: ServerProcess,
  sql: Sql,
  url: string,
  fixtures: Fixtures,
  freezes: Scenario,
): Promise<WatchResults> {
  const bigTenant = fixtures.bigTenants[0] ?? "";
  const bigKeys = await sql<{ tenant_id: string; key_id: string }[]>`
    select tenant_id::text, id::text as key_id from api_keys where tenant_id = ${bigTenant} limit 200
  `;
  // Memory first, while the process has not yet grown and shrunk with the
  // other runs' bursts (its resident size would then fall as it opens streams).
  console.error("watch: memory per idle stream, 1,000 streams ...");
  const idle = await idleStreams(ours, fixtures.tenants);
  console.error("watch: freeze-to-event latency, 100 watchers ...");
  const latency = await freezeToEventLatency(ours, sql, bigKeys, settings.seconds);
  console.error("watch: changes fanned out per second ...");
  const fanned = await fanOut(ours, sql, fixtures.bigTenants[1] ?? bigTenant);
  console.error("watch: freeze throughput with the feed and without ...");
  const throughput = await freezeThroughput(settings, ours, sql, freezes, fixtures.tenants.slice(1));
  console.error("watch: what capturing and announcing a change costs a writer (pgbench) ...");
  const cost = await writerCost(settings, sql, url, bigKeys);
  return { latency, fanOut: fanned, idleStreams: idle, freezeThroughput: throughput, writerCost: cost };
}

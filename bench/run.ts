// `npm run bench [-- --small] [-- --seconds N] [-- --soak [--soak-seconds N]]`
//
// Starts what it needs (database with the data set, this service, the grpc-js
// reference peer), drives both over the gRPC protocol with the load
// generator, measures the same SQL in-process and with pgbench, and writes a
// table (terminal), bench-results/results.json and bench-results/latency.svg.
// Exits 1 when any call fails or a target is missed.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdir, mkdtemp, readdir, readFile, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { create, type DescMessage, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { HealthCheckRequestSchema } from "../gen/grpc/health/v1/health_pb.js";
import {
  FetchKeyByIdRequestSchema,
  FetchKeysRequestSchema,
  FetchKeyUsageRequestSchema,
  UpdateKeyFrozenRequestSchema,
  UpdateKeyUnfrozenRequestSchema,
} from "../gen/keysdriver/v1/keys_driver_pb.js";
import { createSql, type Sql } from "../src/db/client.js";
import { migrate } from "../src/db/migrate.js";
import { findServiceSecret } from "../src/db/secrets.js";
import { createPageTokenCodec, type PageTokenCodec } from "../src/service/page-token.js";
import { createPostgresStore, type KeyStore } from "../src/store.js";
import { renderChart } from "./chart.js";
import { openBenchDatabase } from "./database.js";
import type { LoadPlan, LoadResult, PlannedCall } from "./load.js";
import { benchScale, dataStart, isSeeded, type Scale, seed, smallScale } from "./seed.js";

const { values: args } = parseArgs({
  options: {
    small: { type: "boolean", default: false },
    seconds: { type: "string", default: "10" },
    soak: { type: "boolean", default: false },
    "soak-seconds": { type: "string", default: "330" },
    out: { type: "string", default: "bench-results" },
    only: { type: "string", default: "" },
    rounds: { type: "string", default: "3" },
  },
});
const scale: Scale = args.small ? smallScale : benchScale;
const seconds = Number(args.seconds);
// Ours and the peer take turns this many times per scenario; the median of
// each side is reported, so a burst of noise on the shared cores does not
// decide a comparison.
const rounds = Number(args.rounds);
const concurrency = 32;
const connections = 2;
const dayMs = 86_400_000;

// ---------------------------------------------------------------- processes

function cpuTicks(pid: number): number {
  const stat = execFileSync("cat", [`/proc/${pid}/stat`], { encoding: "utf8" });
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]); // utime + stime
}
const ticksPerSecond = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;

async function startProcess(name: string, script: string, env: Record<string, string>, ready: RegExp) {
  const child = spawn(process.execPath, ["--import", "tsx", script], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  const port = await new Promise<number>((resolve, reject) => {
    const onData = (d: Buffer) => {
      output += d;
      const m = ready.exec(output);
      if (m) resolve(Number(m[1]));
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    child.once("exit", (code) => reject(new Error(`${name} exited with ${code}:\n${output}`)));
  });
  return { child, address: `127.0.0.1:${port}`, name };
}

function stopProcess(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once("exit", () => resolve());
    child.kill("SIGTERM");
  });
}

function runLoad(plan: LoadPlan): Promise<LoadResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", "bench/load.ts"], { stdio: ["pipe", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (d) => {
      out += d;
    });
    child.on("exit", (code) =>
      code === 0 ? resolve(JSON.parse(out) as LoadResult) : reject(new Error(`load exited ${code}`)),
    );
    child.stdin.end(JSON.stringify(plan));
  });
}

// ------------------------------------------------------------------ requests

function frame<D extends DescMessage>(schema: D, init: MessageInitShape<D>): string {
  const body = toBinary(schema, create(schema, init));
  const out = Buffer.alloc(5 + body.length);
  out.writeUInt32BE(body.length, 1);
  out.set(body, 5);
  return out.toString("base64");
}

const kd = "/keysdriver.v1.KeysDriverService";
const ts = (ms: number) => timestampFromDate(new Date(ms));

interface Fixtures {
  sample: { tenant_id: string; key_id: string }[];
  tenants: string[];
  bigTenants: string[];
  deepTokens: { tenantId: string; token: string }[];
  hotKeys: { tenant_id: string; key_id: string }[];
}

async function loadFixtures(sql: Sql, tokens: PageTokenCodec): Promise<Fixtures> {
  const sample = await sql<{ tenant_id: string; key_id: string }[]>`
    select tenant_id::text, key_id::text from bench.sample order by n limit 2000
  `;
  const tenants = [...new Set(sample.map((s) => s.tenant_id))].slice(0, 500);
  const bigTenants = (
    await sql<{ t: string }[]>`
      select bench.tenant_of((i - 1) * ${scale.bigTenantKeys} + 1)::text as t
      from generate_series(1, ${scale.bigTenants}) as i
    `
  ).map((r) => r.t);
  const depth = scale.bigTenantKeys - 50;
  const deepTokens: { tenantId: string; token: string }[] = [];
  for (const tenantId of bigTenants) {
    const rows = await sql<{ created_at_us: bigint; id: string }[]>`
      select (extract(epoch from created_at) * 1000000)::int8 as created_at_us, id::text
      from api_keys where tenant_id = ${tenantId}
      order by created_at desc, id desc
      offset ${depth - 10} limit 10
    `;
    for (const r of rows)
      deepTokens.push({ tenantId, token: tokens.encode(tenantId, { createdAtUs: r.created_at_us, id: r.id }) });
  }
  const hotKeys = await sql<{ tenant_id: string; key_id: string }[]>`
    select bench.tenant_of(k)::text as tenant_id, bench.key_id(k)::text as key_id
    from generate_series(1, ${scale.hotKeys}) as k
  `;
  return { sample, tenants, bigTenants, deepTokens, hotKeys };
}

/** [since, until) windows of `days` days over the data, edges at 10:00 UTC. */
function windows(days: number, count: number): [number, number][] {
  const start = Date.parse(dataStart) + 10 * 3_600_000;
  const room = Math.max(1, scale.days - days);
  return Array.from({ length: count }, (_, i) => {
    const since = start + (i % room) * dayMs + (i % 7) * 60_000;
    return [since, since + days * dayMs];
  });
}

interface Scenario {
  readonly name: string;
  readonly calls: PlannedCall[];
  /** The same store work, run in-process: the ceiling without RPC (none for the empty rpc). */
  readonly raw?: (i: number) => Promise<unknown>;
  /** Compared with the peer (which implements these scenarios too). */
  readonly peer: boolean;
  /** Also measured with connect-node serving gRPC (the transport not chosen). */
  readonly viaConnect?: boolean;
}

function scenarios(f: Fixtures, store: KeyStore, tokens: PageTokenCodec): Scenario[] {
  const pick = <T>(list: T[], i: number) => list[i % list.length] as T;
  const usage = (days: number) => {
    const list = windows(days, 60).flatMap(([since, until]) => f.hotKeys.map((k) => ({ ...k, since, until })));
    return {
      calls: list.map((u) => ({
        path: `${kd}/FetchKeyUsage`,
        frame: frame(FetchKeyUsageRequestSchema, {
          tenantId: u.tenant_id,
          keyId: u.key_id,
          since: ts(u.since),
          until: ts(u.until),
        }),
      })),
      raw: (i: number) => {
        const u = pick(list, i);
        return store.sumUsage(u.tenant_id, u.key_id, {
          sinceUs: BigInt(u.since) * 1000n,
          untilUs: BigInt(u.until) * 1000n,
        });
      },
    };
  };
  const freezeKeys = f.sample.slice(1000, 1500);
  return [
    {
      name: "empty rpc (Health.Check)",
      calls: [{ path: "/grpc.health.v1.Health/Check", frame: frame(HealthCheckRequestSchema, {}) }],
      peer: true,
      viaConnect: true,
    },
    {
      name: "FetchKeyById",
      calls: f.sample.map((s) => ({
        path: `${kd}/FetchKeyById`,
        frame: frame(FetchKeyByIdRequestSchema, { tenantId: s.tenant_id, keyId: s.key_id }),
      })),
      raw: (i) => store.findKey(pick(f.sample, i).tenant_id, pick(f.sample, i).key_id),
      peer: true,
      viaConnect: true,
    },
    {
      name: "FetchKeys first page (50)",
      calls: f.tenants.map((t) => ({
        path: `${kd}/FetchKeys`,
        frame: frame(FetchKeysRequestSchema, { tenantId: t, pageSize: 50 }),
      })),
      raw: (i) => store.listKeys(pick(f.tenants, i), { skip: 0, limit: 51 }),
      peer: true,
    },
    {
      name: `FetchKeys deep page (depth ${scale.bigTenantKeys - 50})`,
      calls: f.deepTokens.map((d) => ({
        path: `${kd}/FetchKeys`,
        frame: frame(FetchKeysRequestSchema, { tenantId: d.tenantId, pageSize: 50, pageToken: d.token }),
      })),
      raw: (i) => {
        const d = pick(f.deepTokens, i);
        return store.listKeys(d.tenantId, { cursor: tokens.decode(d.tenantId, d.token), skip: 0, limit: 51 });
      },
      peer: true,
    },
    { name: "FetchKeyUsage hot key, 1 day", ...usage(1), peer: true },
    { name: `FetchKeyUsage hot key, ${scale.days} days`, ...usage(scale.days), peer: true },
    {
      name: "UpdateKeyFrozen/Unfrozen",
      calls: freezeKeys.flatMap((k) => [
        {
          path: `${kd}/UpdateKeyFrozen`,
          frame: frame(UpdateKeyFrozenRequestSchema, { tenantId: k.tenant_id, keyId: k.key_id }),
        },
        {
          path: `${kd}/UpdateKeyUnfrozen`,
          frame: frame(UpdateKeyUnfrozenRequestSchema, { tenantId: k.tenant_id, keyId: k.key_id }),
        },
      ]),
      raw: (i) => {
        const k = pick(freezeKeys, i >> 1);
        const change = { tenantId: k.tenant_id, keyId: k.key_id, reason: null, actor: null };
        return i % 2 === 0 ? store.freeze(change) : store.unfreeze(change);
      },
      peer: true,
    },
  ];
}

// ---------------------------------------------------------------- measuring

interface Measured {
  callsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  cpuUsPerCall: number;
  errors: Record<string, number>;
}

async function measureServer(
  server: { child: ChildProcess; address: string },
  calls: PlannedCall[],
  durationMs = seconds * 1000,
  bucketMs = 1000,
) {
  const pid = server.child.pid as number;
  const plan: LoadPlan = {
    address: server.address,
    calls,
    connections,
    concurrency,
    warmupMs: 2000,
    durationMs,
    bucketMs,
  };
  const before = { ticks: cpuTicks(pid), at: performance.now() };
  const result = await runLoad(plan);
  const ticks = cpuTicks(pid) - before.ticks;
  // The server's CPU over warm-up and run, over the calls it served in both.
  const elapsed = (performance.now() - before.at) / 1000;
  const served = result.callsPerSecond * elapsed;
  const { "0": ok, ...errors } = result.statuses;
  return {
    result,
    measured: {
      callsPerSecond: result.callsPerSecond,
      p50Ms: result.p50Ms,
      p99Ms: result.p99Ms,
      cpuUsPerCall: ((ticks / ticksPerSecond) * 1e6) / served,
      errors: ok === undefined && result.calls > 0 ? result.statuses : errors,
    } satisfies Measured,
  };
}

async function measureRaw(work: (i: number) => Promise<unknown>): Promise<Measured> {
  const latencies: number[] = [];
  let next = 0;
  const warmEnd = performance.now() + 1000;
  const stopAt = warmEnd + seconds * 1000;
  let cpu = process.cpuUsage();
  let counting = false;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      for (;;) {
        const began = performance.now();
        if (began >= stopAt) return;
        if (!counting && began >= warmEnd) {
          counting = true;
          cpu = process.cpuUsage();
        }
        await work(next++);
        if (began >= warmEnd) latencies.push(performance.now() - began);
      }
    }),
  );
  const used = process.cpuUsage(cpu);
  latencies.sort((a, b) => a - b);
  return {
    callsPerSecond: latencies.length / seconds,
    p50Ms: latencies[Math.floor(latencies.length / 2)] ?? Number.NaN,
    p99Ms: latencies[Math.floor(latencies.length * 0.99)] ?? Number.NaN,
    cpuUsPerCall: (used.user + used.system) / Math.max(1, latencies.length),
    errors: {},
  };
}

/** The run with the median calls/s (its latencies and CPU come with it). */
function median(runs: Measured[]): Measured {
  const sorted = [...runs].sort((a, b) => a.callsPerSecond - b.callsPerSecond);
  return sorted[Math.floor(sorted.length / 2)] as Measured;
}

/**
 * pgbench running `calls`' one statement (the text postgres.js sent), each
 * transaction with the parameters of one of the calls, picked at random from
 * a table the script reads with \gset.
 */
async function measurePgbench(
  sql: Sql,
  url: string,
  calls: readonly { query: string; parameters: readonly unknown[] }[],
): Promise<Measured | undefined> {
  try {
    execFileSync("pgbench", ["--version"], { stdio: "ignore" });
  } catch {
    return undefined;
  }
  const statement = calls[0]?.query ?? "";
  const width = calls[0]?.parameters.length ?? 0;
  const columns = Array.from({ length: width }, (_, i) => `p${i + 1}`);
  await sql.unsafe("drop table if exists bench.pgbench_parameters");
  await sql.unsafe(
    `create table bench.pgbench_parameters (n int primary key${columns.map((c) => `, ${c} text`).join("")})`,
  );
  for (const [n, call] of calls.entries()) {
    const values = call.parameters.map((p) => (p === null || p === undefined ? null : String(p)));
    await sql.unsafe(
      `insert into bench.pgbench_parameters values ($1${columns.map((_, i) => `, $${i + 2}`).join("")})`,
      [n + 1, ...values],
    );
  }
  const pick = width > 0 ? `select ${columns.join(", ")} from bench.pgbench_parameters where n = :i \\gset\n` : "";
  const dir = await mkdtemp(path.join(os.tmpdir(), "pgbench-"));
  const script = path.join(dir, "script.sql");
  // One line for pgbench: comments go first, or they would swallow the rest.
  const text = statement
    .replace(/--[^\n]*/g, "")
    .replace(/\s+/g, " ")
    .replace(/\$(\d+)/g, ":p$1");
  await writeFile(script, `\\set i random(1, ${calls.length})\n${pick}${text};\n`);
  const out = execFileSync(
    "pgbench",
    [
      "-n",
      "-M",
      "prepared",
      "-c",
      "10",
      "-j",
      "2",
      "-T",
      String(seconds),
      "-f",
      script,
      "-l",
      "--log-prefix",
      path.join(dir, "log"),
      url,
    ],
    { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
  );
  const tps = Number(/tps = ([\d.]+)/.exec(out)?.[1]);
  const latencies: number[] = [];
  for (const file of (await readdir(dir)).filter((f) => f.startsWith("log"))) {
    for (const line of (await readFile(path.join(dir, file), "utf8")).split("\n")) {
      const us = Number(line.split(" ")[2]);
      if (line && Number.isFinite(us)) latencies.push(us / 1000);
    }
  }
  latencies.sort((a, b) => a - b);
  return {
    callsPerSecond: tps,
    p50Ms: latencies[Math.floor(latencies.length / 2)] ?? Number.NaN,
    p99Ms: latencies[Math.floor(latencies.length * 0.99)] ?? Number.NaN,
    cpuUsPerCall: Number.NaN,
    errors: {},
  };
}

/** Median latency of `n` sequential calls of `work`, in ms. */
async function sequentialP50(work: (i: number) => Promise<unknown>, n = 60): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < n + 5; i++) {
    const began = performance.now();
    await work(i);
    if (i >= 5) times.push(performance.now() - began);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)] ?? Number.NaN;
}

// --------------------------------------------------------------------- main

const fmt = (n: number, digits = 2) => (Number.isFinite(n) ? n.toFixed(digits) : "-");

async function main(): Promise<number> {
  const db = await openBenchDatabase();
  await migrate(db.sql);
  if (!(await isSeeded(db.sql, scale))) {
    console.error(`loading the ${args.small ? "small" : "bench"} data set (once; kept in the database) ...`);
    await seed(db.sql, scale);
  }
  const secret = await findServiceSecret(db.sql, "page_token");
  if (!secret) throw new Error("no page token secret");
  const tokens = createPageTokenCodec(secret);
  const fixtures = await loadFixtures(db.sql, tokens);
  const captured: { query: string; parameters: readonly unknown[] }[] = [];
  const benchSql = createSql({
    url: db.url,
    poolMax: 10,
    statementTimeoutMs: 0,
    onQuery: (query, parameters) => captured.push({ query, parameters }),
  });
  const store = createPostgresStore(benchSql);
  const list = scenarios(fixtures, store, tokens);

  const common = { DATABASE_URL: db.url, PORT: "0", ROLLUP_INTERVAL_MS: "0", DATABASE_POOL_MAX: "10" };
  const ours = await startProcess("service", "src/main.ts", common, /listening on [\d.]+:(\d+)/);
  const peer = await startProcess("peer", "bench/peer.ts", common, /listening (\d+)/);
  const connectOnly = await startProcess("connect-node", "bench/connect-server.ts", common, /listening (\d+)/);
  // Ctrl-C stops the servers and the embedded database too, not just this process.
  const interrupted = async () => {
    await Promise.all([stopProcess(ours.child), stopProcess(peer.child), stopProcess(connectOnly.child)]);
    await db.close();
    process.exit(130);
  };
  process.once("SIGINT", interrupted);
  process.once("SIGTERM", interrupted);
  const rows: {
    scenario: string;
    ours: Measured;
    peer?: Measured;
    connect?: Measured;
    raw?: Measured;
    pgbench?: Measured;
  }[] = [];
  let failed = false;
  try {
    const only = (args.only ?? "").split(",");
    for (const s of list.filter((s) => only.some((o) => s.name.includes(o)))) {
      console.error(`measuring: ${s.name}`);
      const oursRuns: Measured[] = [];
      const peerRuns: Measured[] = [];
      const connectRuns: Measured[] = [];
      for (let round = 0; round < rounds; round++) {
        oursRuns.push((await measureServer(ours, s.calls)).measured);
        if (s.peer) peerRuns.push((await measureServer(peer, s.calls)).measured);
        if (s.viaConnect) connectRuns.push((await measureServer(connectOnly, s.calls)).measured);
      }
      const raw = s.raw ? await measureRaw(s.raw) : undefined;
      const o = median(oursRuns);
      const p = s.peer ? median(peerRuns) : undefined;
      const connect = connectRuns.length > 0 ? median(connectRuns) : undefined;
      rows.push({ scenario: s.name, ours: o, peer: p, connect, raw });
      for (const [who, runs] of [
        ["ours", oursRuns],
        ["peer", peerRuns],
        ["connect-node", connectRuns],
      ] as const) {
        const errors = runs.filter((m) => Object.keys(m.errors).length > 0);
        if (errors.length > 0) {
          failed = true;
          console.error(`  ${who}: calls failed by grpc-status: ${JSON.stringify(errors.map((m) => m.errors))}`);
        }
      }
    }

    // pgbench on the statement postgres.js actually sends for each scenario,
    // with the parameters of 200 of the scenario's varied calls.
    for (const s of list.filter((s) => s.raw && only.some((o) => s.name.includes(o)))) {
      const row = rows.find((r) => r.scenario === s.name);
      if (!row) continue;
      captured.length = 0;
      for (let i = 0; i < 200; i++) await s.raw?.(i);
      if (new Set(captured.map((c) => c.query)).size !== 1) continue; // e.g. freeze and unfreeze alternate
      console.error(`pgbench: ${s.name}`);
      row.pgbench = await measurePgbench(db.sql, db.url, captured);
    }
    // CountKeys must be an index-only scan: the plan of the statement
    // postgres.js sends, for the largest tenant.
    captured.length = 0;
    await store.countKeys(fixtures.bigTenants[0] ?? "");
    const countSql = captured.at(-1)?.query ?? "";
    const [plan] = await db.sql.unsafe(`explain (analyze, format json) ${countSql}`, [fixtures.bigTenants[0] ?? ""]);
    const planText = JSON.stringify(plan);
    const countPlan = {
      indexOnly: planText.includes('"Index Only Scan"'),
      heapFetches: Number(/"Heap Fetches": ?(\d+)/.exec(planText)?.[1] ?? Number.NaN),
      ms: Number(/"Execution Time": ?([\d.]+)/.exec(planText)?.[1] ?? Number.NaN),
    };

    // Latency against depth and window length, one call at a time.
    console.error("measuring latency against depth and window ...");
    const big = fixtures.bigTenants[0] ?? "";
    const depths = [0, 1000, 5000, 10000, 15000, scale.bigTenantKeys - 50].filter((d) => d < scale.bigTenantKeys);
    const depthPoints = [];
    for (const depth of depths) {
      const [at] = await db.sql<{ created_at_us: bigint; id: string }[]>`
        select (extract(epoch from created_at) * 1000000)::int8 as created_at_us, id::text
        from api_keys where tenant_id = ${big} order by created_at desc, id desc offset ${Math.max(0, depth - 1)} limit 1
      `;
      const cursor = depth === 0 || !at ? undefined : { createdAtUs: at.created_at_us, id: at.id };
      depthPoints.push({
        depth,
        keysetMs: await sequentialP50(() => store.listKeys(big, { cursor, skip: 0, limit: 51 })),
        offsetMs: await sequentialP50(() => store.listKeys(big, { skip: depth, limit: 51 })),
      });
    }
    const hot = fixtures.hotKeys[0] ?? { tenant_id: "", key_id: "" };
    const windowPoints = [];
    for (const days of [1, 7, 30, scale.days]) {
      const list = windows(days, 30);
      windowPoints.push({
        days,
        ms: await sequentialP50((i) => {
          const [since, until] = list[i % list.length] ?? [0, 0];
          return store.sumUsage(hot.tenant_id, hot.key_id, {
            sinceUs: BigInt(since) * 1000n,
            untilUs: BigInt(until) * 1000n,
          });
        }),
      });
    }

    let soak: { bucketsPerSecond: number[]; firstMinute: number; lastMinute: number; ratio: number } | undefined;
    if (args.soak) {
      const soakSeconds = Number(args["soak-seconds"]);
      console.error(`soak: FetchKeyById for ${soakSeconds}s ...`);
      const byId = list.find((s) => s.name === "FetchKeyById") as Scenario;
      const { result } = await measureServer(ours, byId.calls, soakSeconds * 1000, 10_000);
      const perSecond = result.buckets.map((b) => b / 10);
      const firstMinute = perSecond.slice(0, 6).reduce((a, b) => a + b, 0) / 6;
      const lastMinute = perSecond.slice(-6).reduce((a, b) => a + b, 0) / 6;
      soak = { bucketsPerSecond: perSecond, firstMinute, lastMinute, ratio: lastMinute / firstMinute };
      if (Object.keys(result.statuses).some((k) => k !== "0")) failed = true;
    }

    // ------------------------------------------------------------ report
    const header = [
      "scenario",
      "ours calls/s",
      "p50 ms",
      "p99 ms",
      "CPU us/call",
      "peer calls/s",
      "peer p99",
      "peer CPU",
      "ours/peer",
      "raw calls/s",
      "ours/raw",
      "pgbench tps",
    ];
    const table = rows.map((r) => [
      r.scenario,
      fmt(r.ours.callsPerSecond, 0),
      fmt(r.ours.p50Ms),
      fmt(r.ours.p99Ms),
      fmt(r.ours.cpuUsPerCall, 0),
      fmt(r.peer?.callsPerSecond ?? Number.NaN, 0),
      fmt(r.peer?.p99Ms ?? Number.NaN),
      fmt(r.peer?.cpuUsPerCall ?? Number.NaN, 0),
      fmt(r.ours.callsPerSecond / (r.peer?.callsPerSecond ?? Number.NaN)),
      fmt(r.raw?.callsPerSecond ?? Number.NaN, 0),
      fmt(r.ours.callsPerSecond / (r.raw?.callsPerSecond ?? Number.NaN)),
      fmt(r.pgbench?.callsPerSecond ?? Number.NaN, 0),
    ]);
    const widths = header.map((h, i) => Math.max(h.length, ...table.map((row) => (row[i] ?? "").length)));
    const line = (cells: string[]) =>
      cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join("  ");
    console.log(
      `\nKeysDriverService benchmark: ${os.cpus().length} cores, ${concurrency} calls in flight over ${connections} HTTP/2 connections, ${seconds}s per run, median of ${rounds} alternating rounds, gRPC protocol`,
    );
    console.log(
      `data: ${scale.tenants} tenants, ${scale.keys} keys, ${scale.calls} proxy_calls over ${scale.days} days\n`,
    );
    console.log(line(header));
    for (const row of table) console.log(line(row));
    console.log("\nthe same handlers with connect-node serving gRPC (h2c) instead of grpc-js:");
    for (const r of rows.filter((r) => r.connect)) {
      const c = r.connect as Measured;
      console.log(
        `  ${r.scenario}: ${fmt(c.callsPerSecond, 0)} calls/s, p50 ${fmt(c.p50Ms)} ms, p99 ${fmt(c.p99Ms)} ms, CPU ${fmt(c.cpuUsPerCall, 0)} us/call (ours/connect-node ${fmt(r.ours.callsPerSecond / c.callsPerSecond)})`,
      );
    }
    console.log("\nlatency against depth (FetchKeys' SQL, one call at a time, p50 ms):");
    for (const p of depthPoints)
      console.log(`  depth ${String(p.depth).padStart(6)}: keyset ${fmt(p.keysetMs)}  offset ${fmt(p.offsetMs)}`);
    console.log(
      `CountKeys on a ${scale.bigTenantKeys}-key tenant: ${countPlan.indexOnly ? "Index Only Scan" : "NOT an index-only scan"}, ${countPlan.heapFetches} heap fetches, ${fmt(countPlan.ms)} ms`,
    );
    console.log("latency against window (FetchKeyUsage's SQL on a hot key, p50 ms):");
    for (const p of windowPoints) console.log(`  ${String(p.days).padStart(3)} days: ${fmt(p.ms)}`);

    const byId = rows.find((r) => r.scenario === "FetchKeyById");
    const firstPage = depthPoints[0]?.keysetMs ?? Number.NaN;
    const deepPage = depthPoints.at(-1)?.keysetMs ?? Number.NaN;
    const oneDay = windowPoints[0]?.ms ?? Number.NaN;
    const allDays = windowPoints.at(-1)?.ms ?? Number.NaN;
    const targets = [
      {
        target: "FetchKeyById calls/s >= 1.0x peer",
        value: (byId?.ours.callsPerSecond ?? 0) / (byId?.peer?.callsPerSecond ?? 1),
        ok: (v: number) => v >= 1.0,
      },
      {
        target: "FetchKeyById p99 <= 1.1x peer",
        value: (byId?.ours.p99Ms ?? 0) / (byId?.peer?.p99Ms ?? 1),
        ok: (v: number) => v <= 1.1,
      },
      { target: `deep page <= 1.5x first page`, value: deepPage / firstPage, ok: (v: number) => v <= 1.5 },
      {
        target: "CountKeys is an index-only scan (1 = yes)",
        value: countPlan.indexOnly ? 1 : 0,
        ok: (v: number) => v === 1,
      },
      { target: `${scale.days}-day usage <= 1.5x 1-day usage`, value: allDays / oneDay, ok: (v: number) => v <= 1.5 },
      ...(soak
        ? [{ target: "soak: last minute >= 95% of first", value: soak.ratio, ok: (v: number) => v >= 0.95 }]
        : []),
    ].map((t) => ({ target: t.target, value: t.value, met: t.ok(t.value) }));
    console.log("\ntargets:");
    for (const t of targets) console.log(`  ${t.met ? "met " : "MISSED"}  ${t.target}: ${fmt(t.value)}`);
    if (soak)
      console.log(
        `soak: first minute ${fmt(soak.firstMinute, 0)} calls/s, last minute ${fmt(soak.lastMinute, 0)} calls/s`,
      );
    if (targets.some((t) => !t.met)) failed = true;

    await mkdir(args.out, { recursive: true });
    const results = {
      when: new Date().toISOString(),
      scale,
      concurrency,
      connections,
      seconds,
      rounds,
      rows,
      depthPoints,
      windowPoints,
      soak,
      targets,
    };
    await writeFile(path.join(args.out, "results.json"), `${JSON.stringify(results, null, 2)}\n`);
    await writeFile(path.join(args.out, "latency.svg"), renderChart(depthPoints, windowPoints));
    console.log(`\nwrote ${path.join(args.out, "results.json")} and ${path.join(args.out, "latency.svg")}`);
  } finally {
    await Promise.all([stopProcess(ours.child), stopProcess(peer.child), stopProcess(connectOnly.child)]);
    await benchSql.end();
    await db.close();
  }
  return failed ? 1 : 0;
}

process.exitCode = await main();

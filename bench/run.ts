// `npm run bench [-- options]`: see `usage` below.
//
// Starts what it needs (database with the data set, this service, the grpc-js
// reference peer, the same handlers on connect-node), drives them over the
// gRPC protocol with the load generator, measures the same SQL in-process and
// with pgbench, and reports (bench/report.ts). Scenarios: bench/scenarios.ts;
// how each is measured: bench/measure.ts. Exits 1 when any call fails or a
// target is missed.
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";
import { runSoak } from "../reliability/soak.js";
import { createSql } from "../src/db/client.js";
import { findServiceSecret } from "../src/db/secrets.js";
import { createStore, type Store } from "../src/db/store.js";
import { rollUpClosedDays } from "../src/jobs/rollup.js";
import { createPageTokenCodec } from "../src/rpc/page-token.js";
import { createTokenSigner } from "../src/rpc/signed-token.js";
import { migrate } from "../src/schema/migrate.js";
import { openBenchDatabase } from "./database.js";
import {
  type Measured,
  measurePgbench,
  measureRaw,
  measureServer,
  median,
  type ServerProcess,
  type Settings,
  sequentialP50,
  startProcess,
  stopProcess,
} from "./measure.js";
import { type CountPlan, type Row, report, type Soak } from "./report.js";
import { measureReports } from "./reports.js";
import { type Fixtures, keysetPositions, loadFixtures, type Scenario, scenarios, windows } from "./scenarios.js";
import { benchScale, isSeeded, type Scale, seed, smallScale } from "./seed.js";
import { measureWatch } from "./watch.js";

const usage = `npm run bench [-- options]

  --small              the small data set (quick try-out) instead of the bench data set
  --seconds N          seconds per measured run, after a 2 s warm-up (default 10)
  --rounds N           alternating rounds of ours and the peer per scenario; medians are reported (default 3)
  --only NAME[,NAME]   only the scenarios whose names contain one of these ("WatchKeys" for the
                       feed's measurements: latency, fan-out, memory per stream, freeze throughput;
                       "Reports" for FetchUsageReport's against the GROUP BY it replaces)
  --soak               also drive FetchKeyById for --soak-seconds and compare the last minute with the first,
                       then run the reliability soak: writers, readers, watchers and a fault every 100 s
                       on a PostgreSQL of its own for --mixed-soak-seconds (reliability/soak.ts)
  --soak-seconds N     length of the FetchKeyById soak (default 330)
  --mixed-soak-seconds N  length of the reliability soak (default 600)
  --out DIR            where results.json and latency.svg go (default bench-results)
  --help               this text

Environment: DATABASE_URL runs everything on that server (the data set is loaded
into it once); unset, an embedded PostgreSQL in BENCH_PG_DIR (default .data/bench).`;

const { values: args } = parseArgs({
  options: {
    small: { type: "boolean", default: false },
    seconds: { type: "string", default: "10" },
    rounds: { type: "string", default: "3" },
    only: { type: "string", default: "" },
    soak: { type: "boolean", default: false },
    "soak-seconds": { type: "string", default: "330" },
    "mixed-soak-seconds": { type: "string", default: "600" },
    out: { type: "string", default: "bench-results" },
    help: { type: "boolean", default: false },
  },
});

const scale: Scale = args.small ? smallScale : benchScale;
const settings: Settings = { seconds: Number(args.seconds), concurrency: 32, connections: 2 };
const rounds = Number(args.rounds);

/** Ours, the peer and connect-node take turns on each scenario; the median of each side is kept. */
async function measureScenario(s: Scenario, servers: Record<"ours" | "peer" | "connect", ServerProcess>) {
  const runs: Record<"ours" | "peer" | "connect", Measured[]> = { ours: [], peer: [], connect: [] };
  for (let round = 0; round < rounds; round++) {
    runs.ours.push((await measureServer(settings, servers.ours, s.calls)).measured);
    if (s.peer) runs.peer.push((await measureServer(settings, servers.peer, s.calls)).measured);
    if (s.viaConnect) runs.connect.push((await measureServer(settings, servers.connect, s.calls)).measured);
  }
  const failures = Object.entries(runs).flatMap(([who, list]) =>
    list.filter((m) => Object.keys(m.errors).length > 0).map((m) => `${who}: ${JSON.stringify(m.errors)}`),
  );
  const row: Row = {
    scenario: s.name,
    ours: median(runs.ours),
    peer: runs.peer.length > 0 ? median(runs.peer) : undefined,
    connect: runs.connect.length > 0 ? median(runs.connect) : undefined,
    raw: s.raw ? await measureRaw(settings, s.raw) : undefined,
  };
  return { row, failures };
}

/** CountKeys must be an index-only scan: the plan of the statement postgres.js sends, for the largest tenant. */
async function countKeysPlan(url: string, tenantId: string): Promise<CountPlan> {
  const captured: string[] = [];
  const sql = createSql({ url, poolMax: 1, statementTimeoutMs: 0, onQuery: (q) => captured.push(q) });
  try {
    await createStore(sql).countKeys(tenantId);
    const [plan] = await sql.unsafe(`explain (analyze, format json) ${captured.at(-1) ?? ""}`, [tenantId]);
    const text = JSON.stringify(plan);
    return {
      indexOnly: text.includes('"Index Only Scan"'),
      heapFetches: Number(/"Heap Fetches": ?(\d+)/.exec(text)?.[1] ?? Number.NaN),
      ms: Number(/"Execution Time": ?([\d.]+)/.exec(text)?.[1] ?? Number.NaN),
    };
  } finally {
    await sql.end();
  }
}

/** Latency against depth (keyset and offset) and against window length, one call at a time. */
async function latencySeries(sql: Parameters<typeof keysetPositions>[0], store: Store, f: Fixtures) {
  const big = f.bigTenants[0] ?? "";
  const depths = [0, 1000, 5000, 10000, 15000, scale.bigTenantKeys - 50].filter((d) => d < scale.bigTenantKeys);
  const depthPoints = [];
  for (const depth of depths) {
    const [cursor] = depth === 0 ? [] : await keysetPositions(sql, big, depth - 1, 1);
    depthPoints.push({
      depth,
      keysetMs: await sequentialP50(() => store.fetchKeys(big, { cursor, skip: 0, limit: 51 })),
      offsetMs: await sequentialP50(() => store.fetchKeys(big, { skip: depth, limit: 51 })),
    });
  }
  const hot = f.hotKeys[0] ?? { tenant_id: "", key_id: "" };
  const windowPoints = [];
  for (const days of [1, 7, 30, scale.days]) {
    const list = windows(scale, days, 30);
    windowPoints.push({
      days,
      ms: await sequentialP50((i) => {
        const [since, until] = list[i % list.length] ?? [0, 0];
        return store.fetchKeyUsage(hot.tenant_id, hot.key_id, {
          sinceUs: BigInt(since) * 1000n,
          untilUs: BigInt(until) * 1000n,
        });
      }),
    });
  }
  return { depthPoints, windowPoints };
}

async function soak(ours: ServerProcess, byId: Scenario): Promise<{ soak: Soak; ok: boolean }> {
  const soakSeconds = Number(args["soak-seconds"]);
  console.error(`soak: FetchKeyById for ${soakSeconds}s ...`);
  const { result } = await measureServer(settings, ours, byId.calls, soakSeconds * 1000, 10_000);
  const perSecond = result.buckets.map((b) => b / 10);
  const firstMinute = perSecond.slice(0, 6).reduce((a, b) => a + b, 0) / 6;
  const lastMinute = perSecond.slice(-6).reduce((a, b) => a + b, 0) / 6;
  return {
    soak: { bucketsPerSecond: perSecond, firstMinute, lastMinute, ratio: lastMinute / firstMinute },
    ok: Object.keys(result.statuses).every((k) => k === "0"),
  };
}

async function main(): Promise<number> {
  if (args.help) {
    console.log(usage);
    return 0;
  }
  const db = await openBenchDatabase();
  await migrate(db.sql);
  if (!(await isSeeded(db.sql, scale))) {
    console.error(`loading the ${args.small ? "small" : "bench"} data set (once; kept in the database) ...`);
    await seed(db.sql, scale);
  }
  // The servers run without the job: the rollups are brought up to date here
  // (at once when they are; a few minutes after a migration rebuilt them).
  console.error("rolling up closed days ...");
  await rollUpClosedDays(db.sql);
  const secret = await findServiceSecret(db.sql, "page_token");
  if (!secret) throw new Error("no page token secret");
  const tokens = createPageTokenCodec(createTokenSigner(secret));
  const fixtures = await loadFixtures(db.sql, tokens, scale);
  // The in-process ("raw") side, and the statements it sends for pgbench.
  const captured: { query: string; parameters: readonly unknown[] }[] = [];
  const rawSql = createSql({
    url: db.url,
    poolMax: 10,
    statementTimeoutMs: 0,
    onQuery: (query, parameters) => captured.push({ query, parameters }),
  });
  const store = createStore(rawSql);
  const only = args.only.split(",");
  const all = scenarios(fixtures, store, tokens, scale);
  const list = all.filter((s) => only.some((o) => s.name.includes(o)));

  const common = { DATABASE_URL: db.url, PORT: "0", ROLLUP_INTERVAL_MS: "0", DATABASE_POOL_MAX: "10" };
  const servers = {
    ours: await startProcess("service", "src/main.ts", common, /listening on [\d.]+:(\d+)/),
    peer: await startProcess("peer", "bench/peer.ts", common, /listening (\d+)/),
    connect: await startProcess("connect-node", "bench/connect-server.ts", common, /listening (\d+)/),
  };
  const stopAll = () => Promise.all(Object.values(servers).map((s) => stopProcess(s.child)));
  // Ctrl-C stops the servers and the embedded database too, not just this process.
  const interrupted = async () => {
    await stopAll();
    await db.close();
    process.exit(130);
  };
  process.once("SIGINT", interrupted);
  process.once("SIGTERM", interrupted);

  let failed = false;
  try {
    const rows: Row[] = [];
    for (const s of list) {
      console.error(`measuring: ${s.name}`);
      const { row, failures } = await measureScenario(s, servers);
      rows.push(row);
      for (const f of failures) console.error(`  calls failed by grpc-status, ${f}`);
      if (failures.length > 0) failed = true;
    }
    // pgbench on the statement postgres.js actually sends for each scenario,
    // with the parameters of 200 of the scenario's varied calls.
    for (const s of list.filter((s) => s.raw)) {
      const row = rows.find((r) => r.scenario === s.name);
      if (!row) continue;
      captured.length = 0;
      for (let i = 0; i < 200; i++) await s.raw?.(i);
      if (new Set(captured.map((c) => c.query)).size !== 1) continue; // e.g. freeze and unfreeze alternate
      console.error(`pgbench: ${s.name}`);
      row.pgbench = await measurePgbench(settings, db.sql, db.url, captured);
    }
    const countPlan = await countKeysPlan(db.url, fixtures.bigTenants[0] ?? "");
    console.error("measuring latency against depth and window ...");
    const { depthPoints, windowPoints } = await latencySeries(db.sql, store, fixtures);
    const freezes = all.find((s) => s.name.startsWith("UpdateKeyFrozen"));
    const watch =
      only.some((o) => "WatchKeys".includes(o)) && freezes
        ? await measureWatch(settings, servers.ours, db.sql, db.url, fixtures, freezes)
        : undefined;
    const reports = only.some((o) => "Reports".includes(o))
      ? await measureReports(settings, servers.ours, db.sql, fixtures, scale)
      : undefined;
    const byId = list.find((s) => s.name === "FetchKeyById");
    const soaked = args.soak && byId ? await soak(servers.ours, byId) : undefined;
    if (soaked && !soaked.ok) failed = true;
    const met = await report(
      { scale, settings, rounds, rows, depthPoints, windowPoints, countPlan, soak: soaked?.soak, watch, reports },
      args.out,
    );
    if (!met) failed = true;
    if (args.soak) {
      console.error(`soak: reads, freezes, watchers and faults for ${args["mixed-soak-seconds"]}s ...`);
      const mixed = await runSoak(Number(args["mixed-soak-seconds"]), (line) => console.error(line));
      await writeFile(path.join(args.out, "soak.json"), `${JSON.stringify(mixed, null, 2)}\n`);
      console.error(
        `soak: ${mixed.calls} calls (${JSON.stringify(mixed.codes)}); acknowledged writes ${mixed.writes.acknowledged}, lost ${mixed.writes.lost}, unseen by watchers ${mixed.writes.unseenByWatchers}; rows of another tenant ${mixed.crossTenant}; memory MB ${mixed.rssMb.join(" ")} (x${mixed.memoryGrowth.toFixed(2)}): ${mixed.ok ? "kept" : "NOT KEPT"}`,
      );
      if (!mixed.ok) failed = true;
    }
  } finally {
    await stopAll();
    await rawSql.end();
    await db.close();
  }
  return failed ? 1 : 0;
}

process.exitCode = await main();

// What the benchmark prints and writes: the table, the latency series, the
// targets it checks, bench-results/results.json and the SVG chart.
import { mkdir, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { renderChart } from "./chart.js";
import type { Measured, Settings } from "./measure.js";
import type { ReportResult } from "./reports.js";
import type { Scale } from "./seed.js";
import type { WatchResults } from "./watch.js";

/** One scenario's figures, each the median of its rounds. */
export interface Row {
  readonly scenario: string;
  readonly ours: Measured;
  readonly peer?: Measured;
  readonly connect?: Measured;
  readonly raw?: Measured;
  pgbench?: Measured;
}

/** FetchKeys' SQL at one depth, one call at a time. */
export interface DepthPoint {
  readonly depth: number;
  readonly keysetMs: number;
  readonly offsetMs: number;
}

/** FetchKeyUsage's SQL over one window length, one call at a time. */
export interface WindowPoint {
  readonly days: number;
  readonly ms: number;
}

/** Throughput over a long run. */
export interface Soak {
  readonly bucketsPerSecond: number[];
  readonly firstMinute: number;
  readonly lastMinute: number;
  readonly ratio: number;
}

/** CountKeys' plan on the largest tenant. */
export interface CountPlan {
  readonly indexOnly: boolean;
  readonly heapFetches: number;
  readonly ms: number;
}

/** Everything one benchmark run found. */
export interface Results {
  readonly scale: Scale;
  readonly settings: Settings;
  readonly rounds: number;
  readonly rows: Row[];
  readonly depthPoints: DepthPoint[];
  readonly windowPoints: WindowPoint[];
  readonly countPlan: CountPlan;
  readonly soak?: Soak;
  readonly watch?: WatchResults;
  readonly reports?: ReportResult[];
}

interface Target {
  readonly target: string;
  readonly value: number;
  readonly met: boolean;
}

const fmt = (n: number, digits = 2) => (Number.isFinite(n) ? n.toFixed(digits) : "-");

/** The targets the benchmark holds the service to. */
export function targets(r: Results): Target[] {
  const byId = r.rows.find((row) => row.scenario === "FetchKeyById");
  const firstPage = r.depthPoints[0]?.keysetMs ?? Number.NaN;
  const deepPage = r.depthPoints.at(-1)?.keysetMs ?? Number.NaN;
  const oneDay = r.windowPoints[0]?.ms ?? Number.NaN;
  const allDays = r.windowPoints.at(-1)?.ms ?? Number.NaN;
  const checks = [
    {
      target: "FetchKeyById calls/s >= 1.0x peer",
      value: byId ? byId.ours.callsPerSecond / (byId.peer?.callsPerSecond ?? Number.NaN) : Number.NaN,
      ok: (v: number) => v >= 1.0,
    },
    {
      target: "FetchKeyById p99 <= 1.1x peer",
      value: byId ? byId.ours.p99Ms / (byId.peer?.p99Ms ?? Number.NaN) : Number.NaN,
      ok: (v: number) => v <= 1.1,
    },
    { target: "deep page <= 1.5x first page", value: deepPage / firstPage, ok: (v: number) => v <= 1.5 },
    {
      target: "CountKeys is an index-only scan (1 = yes)",
      value: r.countPlan.indexOnly ? 1 : 0,
      ok: (v: number) => v === 1,
    },
    { target: `${r.scale.days}-day usage <= 1.5x 1-day usage`, value: allDays / oneDay, ok: (v: number) => v <= 1.5 },
    ...(r.soak
      ? [{ target: "soak: last minute >= 95% of first", value: r.soak.ratio, ok: (v: number) => v >= 0.95 }]
      : []),
    ...(r.watch
      ? [
          {
            target: "freeze-to-event p99 ms (100 watchers) <= 50",
            value: r.watch.latency.p99Ms,
            ok: (v: number) => v <= 50,
          },
          {
            target: "changes lost by watchers (latency and fan-out runs) = 0",
            value: r.watch.latency.missing + r.watch.fanOut.missing,
            ok: (v: number) => v === 0,
          },
          {
            target: "freeze calls/s with the feed >= 0.9x without",
            value: r.watch.freezeThroughput.ratio,
            ok: (v: number) => v >= 0.9,
          },
        ]
      : []),
    ...(r.reports ?? []).map((rep) => ({
      target: `FetchUsageReport p50 ms, ${rep.name} <= ${rep.targetMs}`,
      value: rep.oursMs,
      ok: (v: number) => v <= rep.targetMs,
    })),
  ];
  // A scenario left out with --only leaves its target unmeasured, not missed.
  return checks
    .filter((t) => !Number.isNaN(t.value))
    .map((t) => ({ target: t.target, value: t.value, met: t.ok(t.value) }));
}

function table(rows: Row[]): string[] {
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
  const cells = rows.map((r) => [
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
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((row) => (row[i] ?? "").length)));
  const line = (row: string[]) =>
    row.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join("  ");
  return [line(header), ...cells.map(line)];
}

/**
 * Prints the results, writes results.json and latency.svg into `outDir`,
 * and returns whether every target was met.
 */
export async function report(r: Results, outDir: string): Promise<boolean> {
  const { settings, scale } = r;
  const lines = [
    `\nKeysDriverService benchmark: ${os.cpus().length} cores, ${settings.concurrency} calls in flight over ${settings.connections} HTTP/2 connections, ${settings.seconds}s per run, median of ${r.rounds} alternating rounds, gRPC protocol`,
    `data: ${scale.tenants} tenants, ${scale.keys} keys, ${scale.calls} proxy_calls over ${scale.days} days\n`,
    ...table(r.rows),
    "\nthe same handlers with connect-node serving gRPC (h2c) instead of grpc-js:",
  ];
  for (const row of r.rows.filter((row) => row.connect)) {
    const c = row.connect as Measured;
    lines.push(
      `  ${row.scenario}: ${fmt(c.callsPerSecond, 0)} calls/s, p50 ${fmt(c.p50Ms)} ms, p99 ${fmt(c.p99Ms)} ms, CPU ${fmt(c.cpuUsPerCall, 0)} us/call (ours/connect-node ${fmt(row.ours.callsPerSecond / c.callsPerSecond)})`,
    );
  }
  lines.push("\nlatency against depth (FetchKeys' SQL, one call at a time, p50 ms):");
  for (const p of r.depthPoints) {
    lines.push(`  depth ${String(p.depth).padStart(6)}: keyset ${fmt(p.keysetMs)}  offset ${fmt(p.offsetMs)}`);
  }
  lines.push(
    `CountKeys on a ${scale.bigTenantKeys}-key tenant: ${r.countPlan.indexOnly ? "Index Only Scan" : "NOT an index-only scan"}, ${r.countPlan.heapFetches} heap fetches, ${fmt(r.countPlan.ms)} ms`,
    "latency against window (FetchKeyUsage's SQL on a hot key, p50 ms):",
  );
  for (const p of r.windowPoints) lines.push(`  ${String(p.days).padStart(3)} days: ${fmt(p.ms)}`);
  if (r.watch) {
    const { latency, fanOut, idleStreams, freezeThroughput } = r.watch;
    lines.push(
      "\nWatchKeys:",
      `  freeze-to-event latency, ${latency.watchers} watchers in another process, ${latency.freezes} freezes at 50/s: p50 ${fmt(latency.p50Ms)} ms, p99 ${fmt(latency.p99Ms)} ms, max ${fmt(latency.maxMs)} ms, ${latency.missing} deliveries missing (call to commit p50 ${fmt(latency.toCommit.p50Ms)} / p99 ${fmt(latency.toCommit.p99Ms)} ms, commit to arrival p50 ${fmt(latency.toArrival.p50Ms)} / p99 ${fmt(latency.toArrival.p99Ms)} ms)`,
      `  fan-out: ${fanOut.changes} changes to ${fanOut.watchers} all-tenant watchers: ${fmt(fanOut.changesPerSecond, 0)} changes/s, ${fmt(fanOut.deliveriesPerSecond, 0)} deliveries/s, ${fanOut.missing} missing, ${fanOut.resumes} resumes`,
      `  memory: ${idleStreams.streams} idle streams, ${fmt(idleStreams.bytesPerStream / 1024, 1)} KiB each (service RSS)`,
      `  UpdateKeyFrozen/Unfrozen: ${fmt(freezeThroughput.withFeed.callsPerSecond, 0)} calls/s with the feed (100 watchers), ${fmt(freezeThroughput.withoutFeed.callsPerSecond, 0)} without (${fmt(freezeThroughput.ratio)}x); p99 ${fmt(freezeThroughput.withFeed.p99Ms)} vs ${fmt(freezeThroughput.withoutFeed.p99Ms)} ms; events captured but nobody watching: ${fmt(freezeThroughput.capturedOnly.callsPerSecond, 0)} calls/s; the watchers process used ${fmt(freezeThroughput.watchersCores)} of a core meanwhile`,
    );
    if (r.watch.writerCost) {
      lines.push("  a key change by a writer (pgbench, 10 clients):");
      for (const { way, measured } of r.watch.writerCost) {
        lines.push(`    ${way}: ${fmt(measured.callsPerSecond, 0)} tps, p99 ${fmt(measured.p99Ms)} ms`);
      }
    }
  }
  if (r.reports) {
    lines.push("\nFetchUsageReport, one call at a time, p50 ms (the plain GROUP BY over proxy_calls it replaces):");
    for (const rep of r.reports) {
      lines.push(`  ${rep.name}: ${fmt(rep.oursMs)} (GROUP BY ${fmt(rep.groupByMs)}), ${rep.rows} rows`);
    }
  }
  const checked = targets(r);
  lines.push("\ntargets:");
  for (const t of checked) lines.push(`  ${t.met ? "met " : "MISSED"}  ${t.target}: ${fmt(t.value)}`);
  if (r.soak) {
    lines.push(
      `soak: first minute ${fmt(r.soak.firstMinute, 0)} calls/s, last minute ${fmt(r.soak.lastMinute, 0)} calls/s`,
    );
  }
  console.log(lines.join("\n"));

  await mkdir(outDir, { recursive: true });
  const json = { when: new Date().toISOString(), ...r, targets: checked };
  await writeFile(path.join(outDir, "results.json"), `${JSON.stringify(json, null, 2)}\n`);
  await writeFile(path.join(outDir, "latency.svg"), renderChart(r.depthPoints, r.windowPoints));
  console.log(`\nwrote ${path.join(outDir, "results.json")} and ${path.join(outDir, "latency.svg")}`);
  return checked.every((t) => t.met);
}

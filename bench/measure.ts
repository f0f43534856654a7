// How the benchmark measures: server processes driven by the load generator
// (bench/load.ts) with their CPU read from /proc, the same work in-process,
// pgbench on one statement, and one-call-at-a-time latency.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { Sql } from "../src/db/client.js";
import { serviceNodeArgs } from "../src/process/node-args.js";
import type { LoadPlan, LoadResult, PlannedCall } from "./load.js";

/** How hard and how long each run drives its target. */
export interface Settings {
  /** Seconds per run, after a warm-up. */
  readonly seconds: number;
  /** Calls in flight at once. */
  readonly concurrency: number;
  /** HTTP/2 connections they are spread over. */
  readonly connections: number;
}

/** One run's figures. */
export interface Measured {
  callsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  cpuUsPerCall: number;
  /** Calls by grpc-status other than OK; empty when every call succeeded. */
  errors: Record<string, number>;
}

/** A server process the load generator drives. */
export interface ServerProcess {
  readonly child: ChildProcess;
  readonly address: string;
  readonly name: string;
}

// ---------------------------------------------------------------- processes

function cpuTicks(pid: number): number {
  const stat = execFileSync("cat", [`/proc/${pid}/stat`], { encoding: "utf8" });
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]); // utime + stime
}
const ticksPerSecond = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;

/** Starts `script` and waits for the line matching `ready`, whose first group is the port. */
export async function startProcess(name: string, script: string, env: Record<string, string>, ready: RegExp) {
  const child = spawn(process.execPath, [...serviceNodeArgs, script], {
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
  return { child, address: `127.0.0.1:${port}`, name } satisfies ServerProcess;
}

/** SIGTERM, then waits for the exit. */
export function stopProcess(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null) return resolve();
    child.once("exit", () => resolve());
    child.kill("SIGTERM");
  });
}

/** Runs the load generator (bench/load.ts) in its own process. */
export function runLoad(plan: LoadPlan): Promise<LoadResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "./src/preload.js", "bench/load.ts"], {
      stdio: ["pipe", "pipe", "inherit"],
    });
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

/** Drives `server` with `calls` for `durationMs`; the server's CPU is read from /proc. */
export async function measureServer(
  settings: Settings,
  server: ServerProcess,
  calls: PlannedCall[],
  durationMs = settings.seconds * 1000,
  bucketMs = 1000,
) {
  const pid = server.child.pid as number;
  const plan: LoadPlan = {
    address: server.address,
    calls,
    connections: settings.connections,
    concurrency: settings.concurrency,
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

/** `work` in this process, `settings.concurrency` at a time: the cost without RPC. */
export async function measureRaw(settings: Settings, work: (i: number) => Promise<unknown>): Promise<Measured> {
  const { seconds, concurrency } = settings;
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
export function median(runs: Measured[]): Measured {
  const sorted = [...runs].sort((a, b) => a.callsPerSecond - b.callsPerSecond);
  return sorted[Math.floor(sorted.length / 2)] as Measured;
}

/**
 * pgbench running `calls`' one statement (the text postgres.js sent), each
 * transaction with the parameters of one of the calls, picked at random from
 * a table the script reads with \gset.
 */
export async function measurePgbench(
  settings: Settings,
  sql: Sql,
  url: string,
  calls: readonly { query: string; parameters: readonly unknown[] }[],
): Promise<Measured | undefined> {
  if (!hasPgbench()) return undefined;
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
  // One line for pgbench: comments go first, or they would swallow the rest.
  const text = statement
    .replace(/--[^\n]*/g, "")
    .replace(/\s+/g, " ")
    .replace(/\$(\d+)/g, ":p$1");
  return await runPgbench(settings, url, `\\set i random(1, ${calls.length})\n${pick}${text};\n`);
}

/** pgbench running `script` on 10 clients for the run's seconds; `env` adds to its environment. */
export async function runPgbench(
  settings: Settings,
  url: string,
  script: string,
  env: Record<string, string> = {},
): Promise<Measured> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "pgbench-"));
  const file = path.join(dir, "script.sql");
  await writeFile(file, script);
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
      String(settings.seconds),
      "-f",
      file,
      "-l",
      "--log-prefix",
      path.join(dir, "log"),
      url,
    ],
    { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } },
  );
  const tps = Number(/tps = ([\d.]+)/.exec(out)?.[1]);
  const latencies: number[] = [];
  for (const name of (await readdir(dir)).filter((f) => f.startsWith("log"))) {
    for (const line of (await readFile(path.join(dir, name), "utf8")).split("\n")) {
      const us = Number(line.split(" ")[2]);
      if (line && Number.isFinite(us)) latencies.push(us / 1000);
    }
  }
  await rm(dir, { recursive: true, force: true });
  latencies.sort((a, b) => a - b);
  return {
    callsPerSecond: tps,
    p50Ms: latencies[Math.floor(latencies.length / 2)] ?? Number.NaN,
    p99Ms: latencies[Math.floor(latencies.length * 0.99)] ?? Number.NaN,
    cpuUsPerCall: Number.NaN,
    errors: {},
  };
}

/** Whether pgbench is installed. */
export function hasPgbench(): boolean {
  try {
    execFileSync("pgbench", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** Median latency of `n` sequential calls of `work`, in ms. */
export async function sequentialP50(work: (i: number) => Promise<unknown>, n = 60): Promise<number> {
  const times: number[] = [];
  for (let i = 0; i < n + 5; i++) {
    const began = performance.now();
    await work(i);
    if (i >= 5) times.push(performance.now() - began);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)] ?? Number.NaN;
}

// `npm run reliability`: the bad-input table and the fuzzing (the tests, which
// note what they saw), the faults under load, and the overload runs; with
// --soak, the soak too. Writes docs/RELIABILITY.md and exits non-zero if
// any promise was not kept.
//
//   npm run reliability [-- --soak] [--soak-seconds 600] [--fuzz-runs 1000] [--out docs/RELIABILITY.md]
import { execFileSync, spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { type FaultReport, runFaults } from "./faults.js";
import { codeNames } from "./harness.js";
import { type OverloadReport, runOverload } from "./overload.js";
import { runSoak, type SoakReport } from "./soak.js";

const { values: args } = parseArgs({
  options: {
    soak: { type: "boolean", default: false },
    "soak-seconds": { type: "string", default: "600" },
    "fuzz-runs": { type: "string", default: "1000" },
    out: { type: "string", default: "docs/RELIABILITY.md" },
  },
});

const log = (line: string) => console.error(line);

interface BadInputSeen {
  suite: "bad-input";
  protocol: string;
  rpc: string;
  what: string;
  expected: string;
  names: string;
  got: string;
  message: string;
  ok: boolean;
}
interface AfterSeen {
  suite: "bad-input-after";
  protocol: string;
  nothingWritten: boolean;
  healthy: boolean;
}
interface FuzzSeen {
  suite: "fuzz";
  request: string;
  seed: number;
  statuses: Record<string, number>;
  wrong: string[];
  healthy: boolean;
  seconds: number;
  slowestMs: number;
}
type Seen = BadInputSeen | AfterSeen | FuzzSeen;

/** Runs the bad-input table and the fuzzing through mocha, as the README's test command does, and reads what they noted. */
async function runTests(fuzzRuns: string): Promise<{ seen: Seen[]; passed: boolean }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "keys-reliability-record-"));
  const file = path.join(dir, "seen.jsonl");
  try {
    const mocha = path.resolve("node_modules/.bin/mocha");
    const code = await new Promise<number | null>((resolve) => {
      const child = spawn(
        mocha,
        [
          "--no-config",
          "--node-option",
          "import=./src/preload.js",
          "--require",
          "test/support/hooks.ts",
          "--timeout",
          "1200000",
          "test/bad-input.test.ts",
          "test/fuzz.test.ts",
        ],
        {
          stdio: ["ignore", "inherit", "inherit"],
          env: { ...process.env, RELIABILITY_RECORD: file, FUZZ_RUNS: fuzzRuns },
        },
      );
      child.on("exit", resolve);
    });
    const text = await readFile(file, "utf8").catch(() => "");
    const seen = text
      .split("\n")
      .filter(Boolean)
      .map((line) => JSON.parse(line) as Seen);
    return { seen, passed: code === 0 };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------ markdown

const cell = (value: unknown) =>
  String(value ?? "")
    .replaceAll("|", "\\|")
    .replaceAll("\n", " ");
const row = (cells: unknown[]) => `| ${cells.map(cell).join(" | ")} |`;
const table = (head: string[], rows: unknown[][]) =>
  [row(head), row(head.map(() => "---")), ...rows.map(row)].join("\n");
const counts = (c: Record<string, number>) =>
  Object.entries(c)
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `${k} ${v.toLocaleString("en")}`)
    .join(", ");
const ms = (x: number | null | undefined) =>
  x === null || x === undefined || Number.isNaN(x) ? "–" : `${x.toFixed(1)} ms`;
const mark = (ok: boolean) => (ok ? "yes" : "**NO**");

function badInputSection(seen: Seen[]): { text: string; ok: boolean; cases: number } {
  const cases = seen.filter((s): s is BadInputSeen => s.suite === "bad-input");
  const after = seen.filter((s): s is AfterSeen => s.suite === "bad-input-after");
  const protocols = [...new Set(cases.map((c) => c.protocol))];
  const byCase = new Map<string, BadInputSeen[]>();
  for (const c of cases) {
    const key = `${c.rpc}\u0000${c.what}`;
    byCase.set(key, [...(byCase.get(key) ?? []), c]);
  }
  const rows = [...byCase.values()].map((seenOf) => {
    const first = seenOf[0] as BadInputSeen;
    return [
      first.rpc,
      first.what,
      `${codeNames[first.expected] ?? first.expected}, names \`${first.names}\``,
      ...protocols.map((p) => {
        const s = seenOf.find((x) => x.protocol === p);
        const got = s ? (codeNames[s.got] ?? s.got) : "–";
        return s ? (s.ok ? `${got}: ${s.message}` : `**${got}**: ${s.message}`) : "–";
      }),
    ];
  });
  const ok = cases.length > 0 && cases.every((c) => c.ok) && after.every((a) => a.nothingWritten && a.healthy);
  const text = [
    `${byCase.size} requests a caller can get wrong, each sent over ${protocols.join(" and ")}: the status it got (expected: the status shown, with a message naming the field). After each protocol's run: nothing written (${after.map((a) => `${a.protocol}: ${mark(a.nothingWritten)}`).join("; ")}), health SERVING (${after.map((a) => `${a.protocol}: ${mark(a.healthy)}`).join("; ")}). The cases are \`test/bad-input.test.ts\`.`,
    "",
    table(["rpc", "request", "expected", ...protocols], rows),
  ].join("\n");
  return { text, ok, cases: byCase.size };
}

function fuzzSection(seen: Seen[], fuzzRuns: string): { text: string; ok: boolean; calls: number } {
  const runs = seen.filter((s): s is FuzzSeen => s.suite === "fuzz");
  const calls = runs.reduce((n, r) => n + Object.values(r.statuses).reduce((a, b) => a + b, 0), 0);
  const ok = runs.length > 0 && runs.every((r) => r.wrong.length === 0 && r.healthy);
  const text = [
    `fast-check generated ${fuzzRuns} requests per property (ids, Unicode and binary strings, timestamps across and beyond the valid range, int32 and int64 edges, random and huge tokens, cursors and etags) and sent each to the real server over gRPC; ${calls.toLocaleString("en")} calls in all. Expected: only statuses a caller's mistake explains (no INTERNAL, UNKNOWN or DATA_LOSS), none hanging (20 s limit each), the server healthy after. The properties are \`test/fuzz.test.ts\`; a seed replays a run (\`FUZZ_SEED\`).`,
    "",
    table(
      ["request", "seed", "statuses", "slowest call", "unexpected", "healthy after"],
      runs.map((r) => [
        r.request,
        r.seed,
        counts(r.statuses),
        ms(r.slowestMs),
        r.wrong.length === 0 ? "none" : r.wrong.join("; "),
        mark(r.healthy),
      ]),
    ),
  ].join("\n");
  return { text, ok, calls };
}

function faultSection(report: FaultReport): { text: string; ok: boolean } {
  const ok =
    report.outcomes.every((o) => o.ok) &&
    report.writes.lost === 0 &&
    report.writes.wrongState === 0 &&
    report.writes.unseenByWatchers === 0 &&
    report.crossTenant === 0 &&
    report.wrongAnswers === 0;
  const text = [
    `The service as \`npm start\` runs it (two workers, on a PostgreSQL of its own) under 8 writers freezing and unfreezing keys, 4 readers and a watcher per tenant (6), ${report.calls.toLocaleString("en")} calls in all, each with a 3 s deadline; a client retries after a failure as RetryInfo says, and a watcher resumes from its last cursor. "+retry" marks a status with RetryInfo; "(transport)" a failure the client saw without a status from the service (a connection cut under the call).`,
    "",
    table(
      ["fault", "expected", "calls by code during it", "first OK after it", "facts", "kept"],
      report.outcomes.map((o) => [
        o.fault,
        o.expected,
        counts(o.codes),
        o.recoveredMs === undefined ? "–" : `${o.recoveredMs} ms`,
        Object.entries(o.facts)
          .map(([k, v]) => `${k}: ${v}`)
          .join(", "),
        mark(o.ok),
      ]),
    ),
    "",
    `Acknowledged writes: ${report.writes.acknowledged.toLocaleString("en")}; lost (answered OK, no change recorded in the database): **${report.writes.lost}**; keys whose state is not their last recorded write's: **${report.writes.wrongState}**; acknowledged changes a watcher of their tenant never received: **${report.writes.unseenByWatchers}** (watch streams resumed ${report.watchResumes} times); rows of another tenant in any answer or stream: **${report.crossTenant}**; acknowledged writes whose answer showed another state: **${report.wrongAnswers}**.`,
  ].join("\n");
  return { text, ok };
}

function overloadSection(reports: OverloadReport[]): { text: string; ok: boolean } {
  let ok = true;
  const parts = reports.map((r) => {
    const [busy, , over, after] = r.phases;
    const baseline = r.phases[1];
    const refused = over?.result.statuses["8"] ?? 0;
    const otherFailures = Object.entries(over?.result.statuses ?? {}).filter(([c]) => c !== "0" && c !== "8");
    // Kept: refusals came back fast, accepted calls' p99 stayed within a bound the cap sets, and the
    // load after the overload was served as before it.
    const recovered =
      after !== undefined &&
      baseline !== undefined &&
      Object.keys(after.result.statuses).every((c) => c === "0") &&
      after.result.p99Ms < Math.max(100, baseline.result.p99Ms * 3);
    const bounded = refused > 0 && otherFailures.length === 0 && (over?.result.okP99Ms ?? Infinity) < 10_000;
    ok &&= recovered && bounded;
    return [
      `**MAX_CALLS_IN_FLIGHT=${r.maxCallsInFlight}**: ${r.rpc}; sustainable load ${r.sustainablePerSecond}/s (completed with ${busy ? "32 calls in flight" : "–"}).`,
      "",
      table(
        ["phase", "started/s", "completed/s", "statuses", "p99 of OK calls", "p99 of refusals", "memory"],
        r.phases.map((p) => [
          p.phase,
          p.arrivalsPerSecond ?? "closed loop",
          Math.round(p.result.callsPerSecond),
          counts(
            Object.fromEntries(
              Object.entries(p.result.statuses).map(([c, n]) => [
                c === "0" ? "OK" : c === "8" ? "RESOURCE_EXHAUSTED" : c,
                n,
              ]),
            ),
          ),
          ms(p.result.okP99Ms),
          ms(p.result.failedP99Ms),
          `${p.rssMb} MB`,
        ]),
      ),
      "",
      `Kept: refusals at once, no other failure, accepted calls' p99 bounded: ${mark(bounded)}; recovered (half the load after, all OK, p99 near the baseline): ${mark(recovered)}.`,
    ].join("\n");
  });
  const text = [
    "One process (`WORKERS=1`) driven by an open-loop load generator (bench/load.ts: calls start on a schedule, whatever the answers, as independent callers' do; at most 1,000 open streams per connection on 4 connections, as HTTP/2 allows; calls the schedule had due beyond that are counted `not-sent`), after a closed-loop run that finds the load it sustains. Past MAX_CALLS_IN_FLIGHT a call is refused before grpc-js reads it (src/server.ts). An accepted call waits behind at most MAX_CALLS_IN_FLIGHT others, so its p99 under overload is about MAX_CALLS_IN_FLIGHT divided by the throughput: set the cap to the latency you want times the throughput you have.",
    "",
    ...parts.flatMap((p) => [p, ""]),
  ].join("\n");
  return { text, ok };
}

function soakSection(report: SoakReport): string {
  return [
    `${report.seconds} s of the fault run's traffic (${report.calls.toLocaleString("en")} calls: ${counts(report.codes)}), a fault every 100 s: ${report.faults.join("; ")}.`,
    "",
    `Acknowledged writes: ${report.writes.acknowledged.toLocaleString("en")}, lost **${report.writes.lost}**, wrong state **${report.writes.wrongState}**, unseen by watchers **${report.writes.unseenByWatchers}**; rows of another tenant: **${report.crossTenant}**. Memory of the service's processes (MB, every 10 s): ${report.rssMb.join(", ")}; the last minute over the second: ${report.memoryGrowth.toFixed(2)} (flat: below 1.2). Kept: ${mark(report.ok)}.`,
  ].join("\n");
}

// ----------------------------------------------------------------------- run

const started = new Date();
log("reliability: the bad-input table and the fuzzing (mocha) ...");
const tests = await runTests(args["fuzz-runs"]);
log("reliability: faults under load ...");
const faults = await runFaults(log);
log("reliability: overload ...");
const overloads = [await runOverload(256, log), await runOverload(64, log)];
const soak = args.soak ? await runSoak(Number(args["soak-seconds"]), log) : undefined;

const badInput = badInputSection(tests.seen);
const fuzz = fuzzSection(tests.seen, args["fuzz-runs"]);
const faultPart = faultSection(faults);
const overloadPart = overloadSection(overloads);
const commit = (() => {
  try {
    return execFileSync("git", ["rev-parse", "--short", "HEAD"], { encoding: "utf8" }).trim();
  } catch {
    return "unknown";
  }
})();

const summary = [
  [
    "bad input",
    `${badInput.cases} cases × 2 protocols answered as expected, nothing written, server healthy`,
    mark(badInput.ok && tests.passed),
  ],
  ["fuzzing", `${fuzz.calls.toLocaleString("en")} generated requests, none INTERNAL, none hanging`, mark(fuzz.ok)],
  [
    "faults",
    `backends cut, PostgreSQL restarted, a worker killed, SIGTERM, under load: ${faults.writes.lost} of ${faults.writes.acknowledged.toLocaleString("en")} acknowledged writes lost`,
    mark(faultPart.ok),
  ],
  [
    "overload",
    overloads
      .map(
        (o) =>
          `cap ${o.maxCallsInFlight}: OK p99 ${ms(o.phases[2]?.result.okP99Ms)} at 10× (${o.sustainablePerSecond * 10}/s)`,
      )
      .join("; "),
    mark(overloadPart.ok),
  ],
  ...(soak
    ? [
        [
          "soak",
          `${soak.seconds} s with faults: lost ${soak.writes.lost}, memory ×${soak.memoryGrowth.toFixed(2)}`,
          mark(soak.ok),
        ],
      ]
    : []),
];

const document = [
  "# Reliability record",
  "",
  `Written by \`npm run reliability${args.soak ? " -- --soak" : ""}\` on ${started.toISOString().slice(0, 16).replace("T", " ")} UTC, commit ${commit}, on ${os.cpus().length} cores (${os.cpus()[0]?.model ?? "unknown CPU"}), Node ${process.versions.node}, PostgreSQL ${faults.postgresVersion} (embedded) for the faults and overload${process.env.DATABASE_URL ? ", the DATABASE_URL server for the tests" : ", the embedded one for the tests"}. Run it again to check a change; \`-- --soak\` adds the ${Number(args["soak-seconds"]) / 60}-minute soak (also \`npm run bench -- --soak\`).`,
  "",
  table(["promise", "what happened", "kept"], summary),
  "",
  "## Bad input",
  "",
  badInput.text,
  "",
  "## Fuzzing",
  "",
  fuzz.text,
  "",
  "## Faults, with nothing lost",
  "",
  faultPart.text,
  "",
  "## Overload",
  "",
  overloadPart.text,
  ...(soak ? ["## Soak", "", soakSection(soak), ""] : []),
].join("\n");

await writeFile(args.out, `${document.trimEnd()}\n`);
log(`reliability: wrote ${args.out}`);
const kept = badInput.ok && tests.passed && fuzz.ok && faultPart.ok && overloadPart.ok && (soak?.ok ?? true);
process.exitCode = kept ? 0 : 1;
if (!kept) log("reliability: a promise was not kept; see the record");

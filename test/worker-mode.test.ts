import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import net from "node:net";
import { expect } from "chai";
import { serviceNodeArgs } from "../src/process/node-args.js";
import { grpcJsCaller } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { newTenant } from "./support/fixtures.js";

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const probe = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

async function metrics(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  expect(res.status).to.equal(200);
  return await res.text();
}

describe("worker mode (WORKERS=2)", () => {
  let db: TestDatabase;
  let child: ChildProcess;
  let port: number;
  let output = "";

  before(async () => {
    db = await createTestDatabase();
    port = await freePort();
    child = spawn(process.execPath, [...serviceNodeArgs, "src/main.ts"], {
      env: { ...process.env, DATABASE_URL: db.url, PORT: String(port), WORKERS: "2", ROLLUP_INTERVAL_MS: "0" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout?.on("data", (d) => {
      output += d;
    });
    child.stderr?.on("data", (d) => {
      output += d;
    });
    // Ready when both workers answer: /metrics is gathered from every
    // worker, and fails (503) while one is still starting.
    const deadline = Date.now() + 30_000;
    for (;;) {
      const ok = await fetch(`http://127.0.0.1:${port}/metrics`).then(
        (r) => r.ok,
        () => false,
      );
      if (ok && /listening on/.test(output)) break;
      if (Date.now() > deadline) throw new Error(`worker mode did not start:\n${output}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  });

  after(async () => {
    if (child && child.exitCode === null) child.kill("SIGKILL");
    await db?.drop();
  });

  it("serves one port from several processes and reports calls summed over all of them", async () => {
    const tenantId = newTenant();
    let calls = 0;
    // Separate clients, separate connections: the kernel spreads them over the workers.
    for (let i = 0; i < 12; i++) {
      const client = grpcJsCaller(`127.0.0.1:${port}`);
      for (let j = 0; j < 5; j++) {
        expect(await client.call("CountKeys", { tenantId })).to.deep.equal({});
        calls++;
      }
      client.close();
    }
    const text = await metrics(port);
    expect(text).to.contain("keysdriver_processes 2");
    expect(text).to.contain(
      `grpc_server_handled_total{grpc_service="keysdriver.v1.KeysDriverService",grpc_method="CountKeys",grpc_type="unary",grpc_code="OK"} ${calls}`,
    );
    expect(text).to.contain(
      `grpc_server_handling_seconds_count{grpc_service="keysdriver.v1.KeysDriverService",grpc_method="CountKeys",grpc_type="unary"} ${calls}`,
    );
    expect(text).to.contain(
      `grpc_server_handling_seconds_bucket{le="+Inf",grpc_service="keysdriver.v1.KeysDriverService",grpc_method="CountKeys",grpc_type="unary"} ${calls}`,
    );
    // The primary's own metrics (the background jobs') are in the same answer.
    expect(text).to.contain("# TYPE keysdriver_usage_rollup_runs_total counter");
  });

  it("drains every worker on SIGTERM and exits cleanly", async () => {
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    child.kill("SIGTERM");
    expect(await exited).to.equal(0);
    expect(output).to.contain("stopped");
    const refused = await fetch(`http://127.0.0.1:${port}/healthz`).then(
      () => false,
      () => true,
    );
    expect(refused, "something still listens on the port").to.equal(true);
  });
});

describe("worker mode when workers die", () => {
  let db: TestDatabase;
  before(async () => {
    db = await createTestDatabase();
  });
  after(async () => {
    await db?.drop();
  });

  function startPrimary(port: number) {
    const child = spawn(process.execPath, [...serviceNodeArgs, "src/main.ts"], {
      env: { ...process.env, DATABASE_URL: db.url, PORT: String(port), WORKERS: "2", ROLLUP_INTERVAL_MS: "0" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout?.on("data", (d) => {
      output += d;
    });
    child.stderr?.on("data", (d) => {
      output += d;
    });
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    return { child, exited, output: () => output };
  }

  it("fails the start, in one line, when no worker can serve (its port is taken)", async function () {
    this.timeout(60_000);
    const blocker = net.createServer().listen(0, "127.0.0.1");
    await new Promise((r) => blocker.once("listening", r));
    try {
      const primary = startPrimary((blocker.address() as net.AddressInfo).port);
      expect(await primary.exited).to.equal(1);
      expect(primary.output()).to.contain("is already in use").and.contain("workers failed to start");
      expect(primary.output()).to.not.match(/\n\s+at /);
    } finally {
      blocker.close();
    }
  });

  it("replaces a worker that keeps dying after a delay that doubles, not in a tight loop", async function () {
    this.timeout(60_000);
    const primary = startPrimary(await freePort());
    try {
      const deadline = Date.now() + 30_000;
      while (!/listening on/.test(primary.output())) {
        if (Date.now() > deadline) throw new Error(primary.output());
        await new Promise((r) => setTimeout(r, 100));
      }
      const delays = () => [...primary.output().matchAll(/starting another in (\d+) s/g)].map((m) => Number(m[1]));
      for (let killed = 0; killed < 3; killed++) {
        // The primary's node children: its workers (not, say, the esbuild
        // service that compiles the TypeScript).
        const workers = execFileSync("ps", ["-o", "pid=,comm=", "--ppid", String(primary.child.pid)], {
          encoding: "utf8",
        })
          .trim()
          .split("\n")
          .map((line) => line.trim().split(/\s+/))
          .filter(([, command]) => command === "node")
          .map(([pid]) => Number(pid));
        expect(workers, primary.output()).to.not.be.empty;
        process.kill(workers[0] as number, "SIGKILL");
        const waitUntil = Date.now() + 10_000;
        while (delays().length <= killed) {
          if (Date.now() > waitUntil) throw new Error(`no replacement announced:\n${primary.output()}`);
          await new Promise((r) => setTimeout(r, 50));
        }
        // Wait for its replacement before killing again.
        await new Promise((r) => setTimeout(r, (delays()[killed] ?? 0) * 1000 + 1500));
      }
      expect(delays()).to.deep.equal([1, 2, 4]);
      primary.child.kill("SIGTERM");
      expect(await primary.exited).to.equal(0);
    } finally {
      if (primary.child.exitCode === null) primary.child.kill("SIGKILL");
    }
  });
});

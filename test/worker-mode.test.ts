import { type ChildProcess, spawn } from "node:child_process";
import net from "node:net";
import { expect } from "chai";
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
    child = spawn(process.execPath, ["--import", "tsx", "src/main.ts"], {
      env: { ...process.env, DATABASE_URL: db.url, PORT: String(port), WORKERS: "2", ROLLUP_INTERVAL_MS: "0" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout?.on("data", (d) => {
      output += d;
    });
    child.stderr?.on("data", (d) => {
      output += d;
    });
    // Ready when both workers answer health checks on the shared port.
    const deadline = Date.now() + 30_000;
    for (;;) {
      const ok = await fetch(`http://127.0.0.1:${port}/healthz`).then(
        (r) => r.ok,
        () => false,
      );
      if (ok && /workers on/.test(output)) break;
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
    await new Promise((r) => setTimeout(r, 2500)); // workers report every second
    const text = await metrics(port);
    expect(text).to.contain("keysdriver_processes 2");
    expect(text).to.contain(`keysdriver_rpc_calls_total{method="CountKeys",code="OK"} ${calls}`);
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

describe("worker mode when a worker cannot start", () => {
  it("restarts it with a delay that doubles, not in a tight loop", async function () {
    this.timeout(60_000);
    const db = await createTestDatabase();
    const blocker = net.createServer().listen(0, "127.0.0.1");
    await new Promise((r) => blocker.once("listening", r));
    const { port } = blocker.address() as net.AddressInfo;
    const child = spawn(process.execPath, ["--import", "tsx", "src/main.ts"], {
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
    try {
      const delays = () => [...output.matchAll(/starting another in (\d+) s/g)].map((m) => Number(m[1]));
      const deadline = Date.now() + 30_000;
      while (delays().length < 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
      const seen = delays();
      expect(seen.length, output).to.be.at.least(5);
      expect(seen.slice(0, 5)).to.deep.equal([1, 2, 4, 8, 16]);
      expect(output).to.contain("is already in use");
      const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
      child.kill("SIGTERM");
      expect(await exited).to.equal(0);
    } finally {
      if (child.exitCode === null) child.kill("SIGKILL");
      blocker.close();
      await db.drop();
    }
  });
});

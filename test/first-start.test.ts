import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { expect } from "chai";
import { createSql } from "../src/db/client.js";
import { startEmbeddedPostgres } from "../src/process/embedded-postgres.js";
import { demoKeys, demoTenants } from "../src/schema/demo.js";
import { grpcJsCaller } from "./support/clients.js";
import { startMain } from "./support/service.js";

// `npm start` on the embedded PostgreSQL, as a new user meets it: run as
// root from a folder only root may enter, killed and started again, stopped
// during start-up, started on a taken port.

const asRoot = process.getuid?.() === 0;

/** The pid of the PostgreSQL running on a data folder (EMBEDDED_PG_DIR), if any. */
function postmasterPid(folder: string): number | undefined {
  const file = path.join(folder, "pgdata", "postmaster.pid");
  return existsSync(file) ? Number(readFileSync(file, "utf8").split("\n")[0]) : undefined;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Processes running initdb, by pid (Linux). */
function runningInitdbs(): number[] {
  const pids: number[] = [];
  for (const name of existsSync("/proc") ? readdirSync("/proc") : []) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (/initdb$/.test(readFileSync(`/proc/${name}/cmdline`, "utf8").split("\0")[0] ?? "")) pids.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

async function eventually(check: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function countKeys(port: number): Promise<unknown> {
  const client = grpcJsCaller(`127.0.0.1:${port}`);
  try {
    return await client.call("CountKeys", { tenantId: "11111111-1111-4111-8111-111111111111" });
  } finally {
    client.close();
  }
}

describe("the first start on the embedded PostgreSQL", function () {
  this.timeout(120_000);
  let folder: string;
  let stageDir: string;
  let env: Record<string, string>;
  const running: ChildProcess[] = [];

  beforeEach(async () => {
    folder = await fs.mkdtemp(path.join(os.tmpdir(), "keys-first-start-"));
    // What the start stages for the postgres user must be where it can reach.
    stageDir = await fs.mkdtemp(path.join(os.tmpdir(), "keys-stage-"));
    await fs.chmod(stageDir, 0o755);
    env = { EMBEDDED_PG_DIR: path.join(folder, "data"), EMBEDDED_PG_STAGE_DIR: stageDir };
  });
  afterEach(async () => {
    for (const child of running.splice(0)) if (child.exitCode === null) child.kill("SIGKILL");
    const pid = existsSync(path.join(folder, "data")) ? postmasterPid(path.join(folder, "data")) : undefined;
    if (pid && alive(pid)) process.kill(pid, "SIGKILL");
    await fs.rm(folder, { recursive: true, force: true });
    await fs.rm(stageDir, { recursive: true, force: true });
  });

  it("serves from a folder only root may enter, keeping the data reachable and saying where", async function () {
    if (!asRoot) this.skip();
    await fs.chmod(folder, 0o700);
    const started = startMain(env);
    running.push(started.child);
    const port = await started.listening;
    expect(await countKeys(port)).to.deep.equal({ count: "6" });
    expect(started.output()).to.contain(`keeps its data in ${stageDir}/data-`).and.contain("data links to it");
    expect((await fs.lstat(path.join(folder, "data"))).isSymbolicLink()).to.equal(true);
    started.child.kill("SIGTERM");
    expect(await started.exited).to.equal(0);

    // And again: the data (demo keys, a freeze) is still there.
    const again = startMain(env);
    running.push(again.child);
    expect(await countKeys(await again.listening)).to.deep.equal({ count: "6" });
    expect(again.output()).to.not.contain("loaded the demo data");
    again.child.kill("SIGTERM");
    expect(await again.exited).to.equal(0);
  });

  it("stops the PostgreSQL a killed start left running, says so, and serves", async () => {
    const first = startMain(env);
    running.push(first.child);
    await first.listening;
    const dataDir = path.join(folder, "data");
    const orphan = postmasterPid(dataDir) as number;
    first.child.kill("SIGKILL");
    await first.exited;
    expect(alive(orphan), "PostgreSQL outlived its service").to.equal(true);

    const second = startMain(env);
    running.push(second.child);
    expect(await countKeys(await second.listening)).to.deep.equal({ count: "6" });
    expect(second.output()).to.contain(`stopping an embedded PostgreSQL (pid ${orphan}) left running`);
    expect(alive(orphan)).to.equal(false);
    second.child.kill("SIGTERM");
    expect(await second.exited).to.equal(0);
    expect(postmasterPid(dataDir), "PostgreSQL still running after the stop").to.equal(undefined);
  });

  it("refuses to share its database with a start that is still running", async () => {
    const first = startMain(env);
    running.push(first.child);
    await first.listening;
    const second = startMain(env);
    running.push(second.child);
    expect(await second.exited).to.equal(1);
    expect(second.output()).to.match(/another start \(pid \d+\) is using the embedded PostgreSQL/);
    expect(await countKeys(await first.listening)).to.deep.equal({ count: "6" });
    first.child.kill("SIGTERM");
    expect(await first.exited).to.equal(0);
  });

  it("stops cleanly, leaving no PostgreSQL behind, when stopped during start-up", async () => {
    const started = startMain(env);
    running.push(started.child);
    // As soon as the database process exists, before the service listens.
    await eventually(
      () => existsSync(path.join(folder, "data", "pgdata", "postmaster.pid")) || started.output().includes("listening"),
      60_000,
    );
    started.child.kill("SIGTERM");
    expect(await started.exited).to.equal(0);
    expect(started.output()).to.not.contain("listening");
    const pid = postmasterPid(path.join(folder, "data"));
    expect(pid === undefined || !alive(pid), "PostgreSQL left running").to.equal(true);
  });

  it("exits non-zero with one line saying what to do when its port is taken, stopping the database", async () => {
    const blocker = net.createServer().listen(0, "127.0.0.1");
    await new Promise((r) => blocker.once("listening", r));
    const { port } = blocker.address() as net.AddressInfo;
    try {
      const started = startMain({ ...env, PORT: String(port) });
      running.push(started.child);
      expect(await started.exited).to.equal(1);
      expect(started.output()).to.contain(`127.0.0.1:${port} is already in use`);
      expect(started.output(), started.output()).to.not.match(/\n\s+at /); // no stack trace
      const pid = postmasterPid(path.join(folder, "data"));
      expect(pid === undefined || !alive(pid), "PostgreSQL left running").to.equal(true);
    } finally {
      blocker.close();
    }
  });

  it("drains and stops on SIGHUP (a closed terminal) as on SIGTERM", async () => {
    const started = startMain(env);
    running.push(started.child);
    await started.listening;
    started.child.kill("SIGHUP");
    expect(await started.exited).to.equal(0);
    expect(started.output()).to.contain("SIGHUP: draining calls").and.contain("stopped");
  });

  it("gives each data folder its own superuser password, readable by its owner only", async () => {
    const a = await startEmbeddedPostgres({ dataDir: path.join(folder, "a"), port: 0, persistent: false, stageDir });
    const b = await startEmbeddedPostgres({ dataDir: path.join(folder, "b"), port: 0, persistent: false, stageDir });
    try {
      const secretOf = (url: string) => decodeURIComponent(new URL(url).password);
      expect(secretOf(a.url)).to.have.length.of.at.least(32).and.not.equal(secretOf(b.url));
      const file = path.join(path.dirname(a.dataDir), "password");
      expect(statSync(file).mode & 0o777).to.equal(0o600);
      const guess = new URL(a.url);
      guess.password = "postgres";
      const sql = createSql({ url: guess.toString(), poolMax: 1, statementTimeoutMs: 0 });
      const refused = await sql`select 1`.catch((err: unknown) => err);
      await sql.end();
      expect(String(refused)).to.contain("password authentication failed");
    } finally {
      await a.stop();
      await b.stop();
    }
  });

  it("runs the PostgreSQL binaries from a staged copy when the postgres user cannot reach them", async function () {
    if (!asRoot) this.skip();
    // A copy of the packaged binaries inside a folder only root may enter,
    // as they are when the project is cloned under /root.
    const { postgres } = (await import(`@embedded-postgres/${os.platform()}-${os.arch()}`)) as { postgres: string };
    const hidden = path.join(folder, "hidden");
    await fs.mkdir(hidden, { mode: 0o700 });
    await fs.cp(path.dirname(path.dirname(postgres)), path.join(hidden, "native"), {
      recursive: true,
      verbatimSymlinks: true,
    });
    const db = await startEmbeddedPostgres({
      dataDir: path.join(folder, "data"),
      port: 0,
      persistent: false,
      stageDir,
      binDir: path.join(hidden, "native"),
    });
    try {
      const sql = createSql({ url: db.url, poolMax: 1, statementTimeoutMs: 0 });
      const [row]: [{ v: string }?] = await sql`select current_setting('server_version_num') as v`;
      await sql.end();
      expect(Number(row?.v)).to.be.at.least(150000);
      expect((await fs.readdir(stageDir)).some((f) => f.startsWith("postgres-"))).to.equal(true);
    } finally {
      await db.stop();
    }
  });

  it("starts afresh after a start that was killed while initialising the database", async function () {
    this.timeout(120_000);
    const first = startMain(env);
    running.push(first.child);
    await eventually(() => existsSync(path.join(folder, "data", "pgdata.init")), 60_000);
    first.child.kill("SIGKILL");
    await first.exited;
    // The interrupted initdb may still be running: the next start stops it.
    const second = startMain(env);
    running.push(second.child);
    expect(await countKeys(await second.listening)).to.deep.equal({ count: "6" });
    expect(runningInitdbs(), "an initdb left running").to.deep.equal([]);
    second.child.kill("SIGTERM");
    expect(await second.exited).to.equal(0);
  });

  it("starts a new, empty database when its data folder's link points at nothing, and says so", async function () {
    if (!asRoot) this.skip();
    await fs.chmod(folder, 0o700);
    await fs.symlink(path.join(stageDir, "data-gone"), path.join(folder, "data"));
    const started = startMain(env);
    running.push(started.child);
    expect(await countKeys(await started.listening)).to.deep.equal({ count: "6" });
    expect(started.output()).to.contain("which is gone: starting with a new, empty database");
    started.child.kill("SIGTERM");
    expect(await started.exited).to.equal(0);
  });

  it("refuses, in one line, a folder that is a file or holds other files, and a taken EMBEDDED_PG_PORT", async () => {
    const file = path.join(folder, "a-file");
    await fs.writeFile(file, "not a folder");
    const notFolder = startMain({ ...env, EMBEDDED_PG_DIR: file });
    expect(await notFolder.exited).to.equal(1);
    expect(notFolder.output()).to.contain("is a file, not a folder");
    expect(await fs.readFile(file, "utf8")).to.equal("not a folder");

    const busy = path.join(stageDir, "busy");
    await fs.mkdir(busy);
    await fs.writeFile(path.join(busy, "notes.txt"), "mine");
    const withFiles = startMain({ ...env, EMBEDDED_PG_DIR: busy });
    expect(await withFiles.exited).to.equal(1);
    expect(withFiles.output()).to.contain("holds files that are not an embedded PostgreSQL's (notes.txt)");

    const blocker = net.createServer().listen(0, "127.0.0.1");
    await new Promise((r) => blocker.once("listening", r));
    try {
      const { port } = blocker.address() as net.AddressInfo;
      const taken = startMain({ ...env, EMBEDDED_PG_PORT: String(port) });
      expect(await taken.exited).to.equal(1);
      expect(taken.output()).to.contain(`port ${port} (EMBEDDED_PG_PORT) is in use`);
      for (const run of [notFolder, withFiles, taken]) expect(run.output()).to.not.match(/\n\s+at /);
    } finally {
      blocker.close();
    }
  });

  it("leaves alone a PostgreSQL it did not start that runs on its folder", async function () {
    this.timeout(120_000);
    const system = existsSync("/usr/lib/postgresql")
      ? (await fs.readdir("/usr/lib/postgresql"))
          .map((v) => `/usr/lib/postgresql/${v}/bin`)
          .find((d) => existsSync(`${d}/pg_ctl`))
      : undefined;
    if (!system || !asRoot) this.skip();
    // A cluster of the machine's own PostgreSQL, run by the postgres user.
    const foreign = path.join(stageDir, "foreign");
    await fs.mkdir(foreign, { mode: 0o700 });
    const id = (flag: string) => Number(execFileSync("id", [flag, "postgres"], { encoding: "utf8" }).trim());
    await fs.chown(foreign, id("-u"), id("-g"));
    const asPostgres = (command: string, args: string[]) =>
      new Promise<number | null>((resolve) => {
        const child = spawn("runuser", ["-u", "postgres", "--", `${system}/${command}`, ...args], { stdio: "ignore" });
        child.on("exit", resolve);
      });
    expect(await asPostgres("initdb", ["-D", foreign, "--auth=trust"])).to.equal(0);
    const port = await new Promise<number>((resolve) => {
      const probe = net.createServer().listen(0, "127.0.0.1", () => {
        const { port } = probe.address() as net.AddressInfo;
        probe.close(() => resolve(port));
      });
    });
    const options = `-p ${port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=`;
    expect(await asPostgres("pg_ctl", ["-D", foreign, "-o", options, "-w", "start"])).to.equal(0);
    try {
      const pid = Number(readFileSync(path.join(foreign, "postmaster.pid"), "utf8").split("\n")[0]);
      const started = startMain({ ...env, EMBEDDED_PG_DIR: foreign });
      expect(await started.exited).to.equal(1);
      expect(started.output()).to.match(/holds a PostgreSQL 1\d database|did not start/);
      expect(alive(pid), "the other PostgreSQL was stopped").to.equal(true);
    } finally {
      await asPostgres("pg_ctl", ["-D", foreign, "-m", "immediate", "stop"]);
    }
  });

  it("acts as the service's role, keys_driver_service, on the embedded database too", async () => {
    const started = startMain(env);
    running.push(started.child);
    const client = grpcJsCaller(`127.0.0.1:${await started.listening}`);
    try {
      const tenantId = demoTenants.acme;
      const keyId = demoKeys.acmeProduction;
      await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "who am I" });
      await client.call("UpdateKeyUnfrozen", { tenantId, keyId });
      const { changes } = await client.call("ListKeyChanges", { tenantId, keyId, pageSize: 1 });
      expect((changes as { dbRole: string }[])[0]?.dbRole).to.equal("keys_driver_service");
    } finally {
      client.close();
    }
    started.child.kill("SIGTERM");
    expect(await started.exited).to.equal(0);
  });

  it("does not wait for idle connections when it stops", async () => {
    const started = startMain({ ...env, SHUTDOWN_GRACE_MS: "2000" });
    running.push(started.child);
    const port = await started.listening;
    const idle = net.connect(port, "127.0.0.1");
    const half = net.connect(port, "127.0.0.1", () => half.write("P"));
    await new Promise((r) => setTimeout(r, 200));
    const began = Date.now();
    started.child.kill("SIGTERM");
    expect(await started.exited).to.equal(0);
    expect(Date.now() - began).to.be.below(5000);
    idle.destroy();
    half.destroy();
  });
});

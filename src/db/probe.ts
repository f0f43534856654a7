import { createSql, type Sql } from "./client.js";

/** How often the database is asked whether it is there, and how long an answer may take. */
export interface ProbeOptions {
  readonly intervalMs: number;
  readonly timeoutMs: number;
  /** Told each time the answer changes: reachable, or not. */
  readonly onChange: (reachable: boolean) => void;
}

/**
 * Asks the database `select 1` every `intervalMs` on a connection of its
 * own (a pool busy with calls must not look like a database that is gone),
 * and reports when it stops or starts answering within `timeoutMs`. A
 * database that accepts the connection and then says nothing (a stopped
 * process, a network partition) counts as gone: the connection is dropped
 * and opened afresh for the next try.
 */
export function startDatabaseProbe(url: string, options: ProbeOptions): { close(): Promise<void> } {
  const open = () =>
    createSql({
      url,
      poolMax: 1,
      statementTimeoutMs: options.timeoutMs,
      connectTimeoutSeconds: Math.max(1, Math.ceil(options.timeoutMs / 1000)),
      applicationName: "keys-driver-service health probe",
    });
  let sql: Sql = open();
  let reachable = true;
  let closed = false;
  let running: Promise<void> | undefined;

  const probe = async () => {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), options.timeoutMs);
    });
    const answered = sql`select 1`.then(
      () => true,
      () => false,
    );
    const ok = await Promise.race([answered, timedOut]);
    clearTimeout(timer);
    if (!ok && !closed) {
      // Whatever the connection is waiting for is abandoned with it.
      const stale = sql;
      sql = open();
      void stale.end({ timeout: 0 }).catch(() => {});
    }
    if (ok !== reachable && !closed) {
      reachable = ok;
      options.onChange(ok);
    }
  };
  const timer = setInterval(() => {
    running ??= probe().finally(() => {
      running = undefined;
    });
  }, options.intervalMs);
  timer.unref();
  return {
    async close() {
      closed = true;
      clearInterval(timer);
      await running;
      await sql.end({ timeout: 0 });
    },
  };
}

/** The operator asked the process to stop. */
export interface ShutdownRequest {
  /** Resolves with the first stop signal's name. */
  readonly requested: Promise<string>;
  /** The first stop signal's name, once one arrived. */
  readonly signal: string | undefined;
}

/**
 * Listens for the signals that mean "stop": SIGINT (Ctrl-C), SIGTERM (a
 * supervisor) and SIGHUP (the terminal closed). Installed first thing, so a
 * signal during start-up is kept rather than killing the process with the
 * database half-started. Every later signal is swallowed: a stop is under
 * way, and Node's default action (exit at once) would cut the drain short.
 */
export function listenForShutdown(): ShutdownRequest {
  let signal: string | undefined;
  const requested = new Promise<string>((resolve) => {
    for (const name of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
      process.on(name, () => {
        signal ??= name;
        resolve(signal);
      });
    }
  });
  return {
    requested,
    get signal() {
      return signal;
    },
  };
}

/** The operator asked the process to stop. */
export interface ShutdownRequest {
  /** Resolves with the first stop signal's name. */
  readonly requested: Promise<string>;
  /** The first stop signal's name, once one arrived. */
  readonly signal: string | undefined;
}

/**
 * Listens for the signals that mean "stop": SIGINT (Ctrl-C), SIGTERM (a
 * supervisor) and SIGHUP (the terminal closed). Installed as soon as the
 * executable runs, so a signal during start-up ends the start cleanly
 * rather than killing the process with the database half-started. The same
 * signal often arrives twice at once (from npm and from the terminal); a
 * repeat within a second is ignored, and a later one calls `onInsist`: the
 * operator does not want to wait for the drain.
 */
export function listenForShutdown(onInsist: (signal: string) => void): ShutdownRequest {
  let signal: string | undefined;
  let firstAt = 0;
  const requested = new Promise<string>((resolve) => {
    for (const name of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
      process.on(name, () => {
        if (signal === undefined) {
          signal = name;
          firstAt = Date.now();
          resolve(name);
        } else if (Date.now() - firstAt > 1000) {
          onInsist(name);
        }
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

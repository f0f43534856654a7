/** A job that runs now and then every `intervalMs`, until stopped. */
export interface PeriodicJob {
  /** Stops the timer and waits for a run in progress. */
  stop(): Promise<void>;
}

/**
 * Runs `job` now and then every `intervalMs`. Runs never overlap within a
 * process (jobs keep apart across processes with advisory locks of their
 * own); a failed run is reported and retried at the next tick.
 */
export function startPeriodicJob(
  job: () => Promise<unknown>,
  options: { readonly intervalMs: number; readonly onError: (err: unknown) => void },
): PeriodicJob {
  let running: Promise<unknown> = Promise.resolve();
  let stopped = false;
  const run = () => {
    running = running.then(job).catch(options.onError);
  };
  run();
  const timer = setInterval(() => {
    if (!stopped) run();
  }, options.intervalMs);
  timer.unref();
  return {
    async stop() {
      stopped = true;
      clearInterval(timer);
      await running;
    },
  };
}

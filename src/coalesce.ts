/** A task many events ask for, run once for all of them that arrive close together. */
export interface CoalescedTask {
  /** Asks for a run that starts after this call. */
  request(): void;
  /** Drops a run waiting for its interval (one under way finishes). */
  cancel(): void;
}

/**
 * Runs `task` on request, never two at once and at most once per
 * `intervalMs`. The first request after a quiet spell runs at once; the
 * requests made while it runs, or before `intervalMs` has passed since it
 * started, share one more run when it has. So every request is followed by
 * a run that starts after it, and a burst of any size costs one run per
 * interval. A run's failure is the task's own business: it is not reported
 * here, and the next request runs it again.
 */
export function coalesced(task: () => Promise<unknown>, intervalMs: number): CoalescedTask {
  let running = false;
  let owed = false;
  let lastStart = Number.NEGATIVE_INFINITY;
  let timer: NodeJS.Timeout | undefined;

  const run = () => {
    running = true;
    lastStart = performance.now();
    // A task that throws rather than rejects fails this run only.
    void Promise.resolve()
      .then(task)
      .catch(() => {})
      .finally(() => {
        running = false;
        if (owed) {
          owed = false;
          request();
        }
      });
  };
  const request = () => {
    if (running) {
      owed = true;
      return;
    }
    if (timer !== undefined) return;
    const wait = lastStart + intervalMs - performance.now();
    if (wait <= 0) {
      run();
      return;
    }
    // Timers may fire a little early: the interval is checked again then.
    timer = setTimeout(() => {
      timer = undefined;
      request();
    }, Math.ceil(wait));
    timer.unref();
  };
  return {
    request,
    cancel() {
      clearTimeout(timer);
      timer = undefined;
      owed = false;
    },
  };
}

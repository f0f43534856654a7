import { Code, type ConnectError } from "@connectrpc/connect";
import { coalesced } from "../coalesce.js";
import { isStrayCancel, type Sql } from "../db/client.js";
import {
  type EventRow,
  type EventScope,
  type FeedRead,
  holdersEnded,
  laterPosition,
  positionHolders,
  readFeed,
  settledHead,
} from "../db/events.js";
import { wakeUpIntervalMs } from "../db/keys.js";
import { rpcError } from "../errors.js";

/**
 * The process's one reader of key_events: it listens for the database's
 * wake-up (LISTEN/NOTIFY on one connection), reads what is new from the
 * table (the truth), and hands each new event to every subscribed stream
 * whose scope it matches. A slow poll backs up the wake-ups, and a listener
 * that reconnects reads what it missed.
 */
export interface KeyFeed {
  /** Every event up to this position has been handed to the subscribers of the time. */
  readonly position: bigint;
  /** Streams subscribed now. */
  readonly subscribers: number;
  /** True while the feed's last read of the table failed (it keeps retrying). */
  readonly failing: boolean;
  /** Reads what has committed by now; resolves with the position read through. */
  readNow(): Promise<bigint>;
  /** Resolves once the feed has read the table once; UNAVAILABLE if it cannot. */
  ready(): Promise<void>;
  /**
   * Starts queueing the events in `scope` after the feed's current position
   * (the subscription's `from`), at most `maxQueued` waiting at once: past
   * that the subscription fails with RESOURCE_EXHAUSTED.
   */
  subscribe(scope: EventScope, maxQueued: number): Subscription;
  /** Ends every subscription with UNAVAILABLE (the server is going away). */
  endSubscriptions(): void;
  /** Stops listening and polling. */
  close(): Promise<void>;
}

/** What a subscription yields: new events in scope, and how far the feed has read. */
export interface Delivery {
  readonly events: EventRow[];
  /** Every event up to here has been considered for this subscription. */
  readonly through: bigint;
}

export interface Subscription {
  /** The feed's position when the subscription began. */
  readonly from: bigint;
  /** Every event up to here has been considered for this subscription (queued if in scope). */
  readonly through: bigint;
  /**
   * The events queued since the last call (waiting for some when there are
   * none), or undefined when `waitMs` passed without any. Throws the
   * subscription's failure, or when `signal` aborts.
   */
  next(signal: AbortSignal, waitMs: number): Promise<Delivery | undefined>;
  /** Throws the subscription's failure, if it has failed (shutdown, fallen behind). */
  throwIfFailed(): void;
  close(): void;
}

export interface KeyFeedOptions {
  /** The slow poll that backs up the wake-ups, in milliseconds. */
  readonly pollIntervalMs: number;
  /** Told when reading fails, once per outage (the feed retries on its own). */
  readonly onError: (err: unknown) => void;
}

const batchSize = 1000;
/**
 * A position missing below a visible one is nearly always a commit a moment
 * from done: the feed reads again after secondLookMs before it asks who may
 * hold it (pg_locks, which briefly takes every lock partition of the
 * server). A position still missing then is checked for being settled
 * (every transaction that may hold it has ended) after firstSettleCheckMs,
 * the wait between checks doubling to maxSettleCheckMs while one of them
 * runs on (a long transaction, a prepared one).
 */
const secondLookMs = 2;
const firstSettleCheckMs = 5;
const maxSettleCheckMs = 1000;

function matches(scope: EventScope, event: EventRow): boolean {
  if (scope.allTenants) return true;
  if (event.key.tenant_id !== scope.tenantId) return false;
  return scope.keyIds.length === 0 || scope.keyIds.includes(event.key.id);
}

class QueuedSubscription implements Subscription {
  private queue: EventRow[] = [];
  through: bigint;
  private failure: ConnectError | undefined;
  private wake: (() => void) | undefined;

  constructor(
    readonly from: bigint,
    readonly scope: EventScope,
    private readonly maxQueued: number,
    private readonly onClose: (s: QueuedSubscription) => void,
  ) {
    this.through = from;
  }

  push(events: EventRow[], through: bigint): void {
    if (this.failure) return;
    const queued = this.queue.length;
    for (const event of events) if (matches(this.scope, event)) this.queue.push(event);
    this.through = through;
    if (this.queue.length === queued) return;
    if (this.queue.length > this.maxQueued) {
      this.fail(
        rpcError(
          Code.ResourceExhausted,
          `the stream fell more than ${this.maxQueued} changes behind; resume from the last cursor received`,
          { reason: "STREAM_FELL_BEHIND", retryAfterMs: 0, metadata: { max_queued: String(this.maxQueued) } },
        ),
      );
    }
    this.wake?.();
  }

  fail(error: ConnectError): void {
    this.failure ??= error;
    this.queue = [];
    this.wake?.();
  }

  async next(signal: AbortSignal, waitMs: number): Promise<Delivery | undefined> {
    if (this.queue.length === 0 && !this.failure) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, waitMs);
        signal.addEventListener("abort", done, { once: true });
        this.wake = done;
        function done() {
          clearTimeout(timer);
          signal.removeEventListener("abort", done);
          resolve();
        }
      });
      this.wake = undefined;
    }
    signal.throwIfAborted();
    if (this.failure) throw this.failure;
    if (this.queue.length === 0) return undefined;
    const events = this.queue;
    this.queue = [];
    return { events, through: this.through };
  }

  throwIfFailed(): void {
    if (this.failure) throw this.failure;
  }

  close(): void {
    this.onClose(this);
  }
}

/**
 * Starts the process's feed on `sql`, from the table's head. The database
 * need not be reachable yet: until the feed has read the head once,
 * subscribing fails with UNAVAILABLE, and the feed keeps trying.
 */
const feedNotReady = () =>
  rpcError(Code.Unavailable, "the feed of key changes is not available yet; retry", {
    reason: "FEED_NOT_READY",
    retryAfterMs: 1000,
  });

export function startKeyFeed(sql: Sql, options: KeyFeedOptions): KeyFeed {
  const subscribers = new Set<QueuedSubscription>();
  let position: bigint | undefined;
  let listening: { unlisten(): Promise<void> } | undefined;
  let reading: Promise<void> | undefined;
  let readAgain = false;
  let failing = false;
  let closed = false;

  // A position missing below a visible one (a commit still under way, or a
  // transaction that failed): events after it wait until it arrives, or
  // until every transaction that may hold it has ended (then it never will,
  // and positions up to the visible one missing then are passed over).
  let missing:
    | { position: bigint; visible: bigint; holders: string[] | undefined; checkAt: number; waitMs: number }
    | undefined;
  let settledThrough = 0n;
  let recheck: NodeJS.Timeout | undefined;

  // Reads until the table has nothing newer; a wake-up during a read makes
  // one more pass, so none is lost and none piles up. The first read only
  // finds the head: the feed starts from now.
  const read = (): Promise<void> => {
    if (closed) return Promise.resolve();
    if (reading) {
      readAgain = true;
      return reading;
    }
    // Shared by every stream and call waiting on it, on the feed's own sql:
    // tied to none of them, so not cancelled with any one.
    reading = (async () => {
      try {
        do {
          readAgain = false;
          if (position === undefined) position = await settledHead(sql);
          for (;;) {
            if (missing?.holders !== undefined && Date.now() >= missing.checkAt) {
              if (await holdersEnded(sql, missing.holders)) {
                settledThrough = laterPosition(settledThrough, missing.visible);
                missing = undefined;
              } else {
                missing.waitMs = Math.min(missing.waitMs * 2, maxSettleCheckMs);
                missing.checkAt = Date.now() + missing.waitMs;
              }
            }
            const found: FeedRead = await readFeed(sql, position, batchSize, settledThrough);
            for (const s of subscribers) s.push(found.events, found.through);
            position = found.through;
            if (found.missing !== undefined) {
              if (missing?.position !== found.missing.position) {
                missing = {
                  ...found.missing,
                  holders: undefined,
                  checkAt: Date.now() + secondLookMs,
                  waitMs: firstSettleCheckMs,
                };
              } else if (missing.holders === undefined && Date.now() >= missing.checkAt) {
                // Still missing at the second look. Whoever took it holds the
                // lock now or has ended: with no holder at all it never comes.
                missing.holders = await positionHolders(sql);
                if (missing.holders.length === 0) {
                  settledThrough = laterPosition(settledThrough, missing.visible);
                  missing = undefined;
                  continue;
                }
                missing.checkAt = Date.now() + firstSettleCheckMs;
              }
              clearTimeout(recheck);
              recheck = setTimeout(() => void read(), Math.max(0, missing.checkAt - Date.now()));
              recheck.unref();
              break;
            }
            missing = undefined;
            if (found.complete) break;
          }
        } while (readAgain && !closed);
        failing = false;
      } catch (err) {
        if (isStrayCancel(err) && !closed) {
          // Another call's late cancel hit this read's connection: nothing
          // is wrong with the database; read again at once.
          readAgain = true;
          setImmediate(() => void read());
          return;
        }
        // Told once per outage, not at every retry.
        if (!failing && !closed) options.onError(err);
        failing = true;
      } finally {
        reading = undefined;
      }
    })();
    return reading;
  };

  // A burst of wake-ups (changes through several processes, or by SQL,
  // each notifying) makes one read per interval, as the writers do.
  const wakeUps = coalesced(read, wakeUpIntervalMs);

  // One listening connection for the process; postgres.js re-establishes it
  // when it drops and calls the second callback again, which reads what the
  // lost connection missed. Until the first LISTEN succeeds, the poll below
  // retries it.
  const listen = async () => {
    if (listening || closed) return;
    try {
      listening = await sql.listen(
        "key_events",
        () => wakeUps.request(),
        () => void read(),
      );
      if (closed) await listening.unlisten();
    } catch (err) {
      if (!failing && !closed) options.onError(err);
      failing = true;
    }
  };
  void listen();
  void read();
  const poll = setInterval(() => {
    void listen();
    void read();
  }, options.pollIntervalMs);
  poll.unref();

  const endSubscriptions = () => {
    const shutdown = rpcError(Code.Unavailable, "the server is shutting down; reconnect with the last cursor", {
      reason: "SHUTTING_DOWN",
      retryAfterMs: 0,
    });
    for (const s of subscribers) s.fail(shutdown);
  };
  return {
    get position() {
      return position ?? 0n;
    },
    get subscribers() {
      return subscribers.size;
    },
    get failing() {
      return failing;
    },
    subscribe(scope, maxQueued) {
      if (position === undefined) {
        void read();
        throw feedNotReady();
      }
      const subscription = new QueuedSubscription(position, scope, maxQueued, (s) => subscribers.delete(s));
      subscribers.add(subscription);
      return subscription;
    },
    async ready() {
      if (position === undefined) await this.readNow();
    },
    async readNow() {
      await read();
      if (position === undefined) {
        throw feedNotReady();
      }
      return position;
    },
    endSubscriptions,
    async close() {
      closed = true;
      clearInterval(poll);
      wakeUps.cancel();
      clearTimeout(recheck);
      endSubscriptions();
      await listening?.unlisten();
      await reading;
    },
  };
}

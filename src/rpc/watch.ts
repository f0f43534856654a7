import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, type HandlerContext } from "@connectrpc/connect";
import {
  type KeyChange,
  KeyChangeKind,
  KeyChangeSchema,
  type WatchKeysRequest,
  type WatchKeysResponse,
  WatchKeysResponseSchema,
  WatchMarker,
} from "../../gen/keysdriver/v1/keys_driver_pb.js";
import { laterPosition } from "../db/events.js";
import type { EventRow, EventScope, Store } from "../db/store.js";
import { invalidArgument, rpcError } from "../errors.js";
import type { KeyFeed } from "../feed/key-feed.js";
import type { PositionTokens } from "./cursors.js";
import { keySnapshot, timestampFromMicros } from "./snapshots.js";
import { requireUuid } from "./validate.js";

/** How WatchKeys streams behave (WATCH_* settings, src/config.ts). */
export interface WatchSettings {
  /** An idle stream gets a PROGRESS marker this often. */
  readonly progressIntervalMs: number;
  /** A stream this many changes behind its reader ends with RESOURCE_EXHAUSTED. */
  readonly maxQueuedChanges: number;
  /** Streams reading their initial state at once; more wait (each holds a database connection). */
  readonly initialStateReaders: number;
}

const maxKeyIds = 1000;
const catchUpBatch = 1000;

const kinds = {
  created: KeyChangeKind.CREATED,
  updated: KeyChangeKind.UPDATED,
  frozen: KeyChangeKind.FROZEN,
  unfrozen: KeyChangeKind.UNFROZEN,
  deleted: KeyChangeKind.DELETED,
} as const;

/** The caller's view of one change. */
export function keyChange(event: EventRow, cursor: string): KeyChange {
  return create(KeyChangeSchema, {
    cursor,
    kind: kinds[event.kind] ?? KeyChangeKind.UNSPECIFIED,
    key: keySnapshot(event.key),
    changedAt: timestampFromMicros(event.changed_at_us),
    reason: event.reason ?? "",
    actor: event.actor ?? "",
    dbRole: event.db_role,
    application: event.application,
  });
}

const tooOld = () =>
  rpcError(
    Code.OutOfRange,
    "resume_cursor is older than the retained history of changes: list the keys again (or watch with send_initial_state), then watch from the new cursor",
    { reason: "CURSOR_EXPIRED" },
  );

/** What a WatchKeys request asks to watch; INVALID_ARGUMENT naming the field otherwise. */
export function watchScope(req: WatchKeysRequest): EventScope {
  if (req.allTenants) {
    if (req.tenantId !== "") throw invalidArgument("tenant_id", "must be empty when all_tenants is set");
    if (req.keyIds.length > 0) throw invalidArgument("key_ids", "can only be given with a tenant_id");
    return { allTenants: true };
  }
  if (req.tenantId === "") throw invalidArgument("tenant_id", "is required (or set all_tenants to watch every tenant)");
  const tenantId = requireUuid("tenant_id", req.tenantId);
  if (req.keyIds.length > maxKeyIds) throw invalidArgument("key_ids", `must list at most ${maxKeyIds} keys`);
  const keyIds = [...new Set(req.keyIds.map((id, i) => requireUuid(`key_ids[${i}]`, id)))];
  return { allTenants: false, tenantId, keyIds };
}

/** A counting semaphore: at most `size` holders at once, the rest wait in turn. */
function slots(size: number) {
  let free = size;
  const waiting: (() => void)[] = [];
  return {
    async take(signal: AbortSignal): Promise<() => void> {
      if (free > 0) free--;
      else {
        await new Promise<void>((resolve, reject) => {
          const turn = () => {
            signal.removeEventListener("abort", abandon);
            resolve();
          };
          const abandon = () => {
            waiting.splice(waiting.indexOf(turn), 1);
            reject(signal.reason);
          };
          waiting.push(turn);
          signal.addEventListener("abort", abandon, { once: true });
        });
      }
      let released = false;
      return () => {
        if (released) return;
        released = true;
        const next = waiting.shift();
        if (next) next();
        else free++;
      };
    },
  };
}

/**
 * The WatchKeys handler. The stream subscribes to the process's feed first,
 * then reads what came before from the database (the initial state, or the
 * changes after a resume cursor), so that nothing committing meanwhile is
 * missed; whatever both deliver is sent once, by position.
 */
export function createWatchKeys(store: Store, feed: KeyFeed, tokens: PositionTokens, settings: WatchSettings) {
  const initialStateSlots = slots(settings.initialStateReaders);
  // One change goes to every stream that watches it, from the same event
  // object: its message (with the cursor of each scope: a tenant, or all
  // tenants) is built once, not once per stream.
  const built = new WeakMap<EventRow, Map<string, WatchKeysResponse>>();
  const changeMessage = (event: EventRow, scope: EventScope) => {
    const key = scope.allTenants ? "*" : scope.tenantId;
    let byScope = built.get(event);
    if (!byScope) {
      byScope = new Map();
      built.set(event, byScope);
    }
    let message = byScope.get(key);
    if (!message) {
      const cursor = tokens.cursor(scope, event.position);
      message = create(WatchKeysResponseSchema, { change: keyChange(event, cursor), cursor });
      byScope.set(key, message);
    }
    return message;
  };
  return async function* watchKeys(req: WatchKeysRequest, context: HandlerContext): AsyncGenerator<WatchKeysResponse> {
    const scope = watchScope(req);
    if (req.sendInitialState && req.resumeCursor !== "") {
      throw invalidArgument("send_initial_state", "cannot be combined with resume_cursor");
    }
    const resumeFrom = req.resumeCursor === "" ? undefined : tokens.positionOfCursor(scope, req.resumeCursor);
    const response = (
      init: Pick<MessageInitShape<typeof WatchKeysResponseSchema>, "change" | "current" | "marker">,
      position: bigint,
    ) => create(WatchKeysResponseSchema, { ...init, cursor: tokens.cursor(scope, position) });
    const change = (event: EventRow) => changeMessage(event, scope);

    await feed.ready();
    const subscription = feed.subscribe(scope, settings.maxQueuedChanges);
    try {
      let through: bigint;
      if (req.sendInitialState) {
        through = subscription.from;
        const release = await initialStateSlots.take(context.signal);
        try {
          for await (const part of store.fetchKeysAtSnapshot(scope)) {
            subscription.throwIfFailed();
            if ("head" in part) through = part.head;
            else for (const key of part.keys) yield response({ current: keySnapshot(key) }, through);
          }
        } finally {
          release();
        }
        yield response({ marker: WatchMarker.SYNCED }, through);
      } else if (resumeFrom === undefined) {
        // From now: whatever has committed by now is read first, not sent.
        through = laterPosition(await feed.readNow(), subscription.from);
      } else {
        const bounds = await store.feedBounds();
        if (resumeFrom < bounds.prunedThrough) throw tooOld();
        if (resumeFrom > bounds.head) {
          // Positions this database never reached: it was restored from an older backup.
          throw rpcError(
            Code.OutOfRange,
            "resume_cursor is ahead of this database's history of changes: list the keys again (or watch with send_initial_state)",
            { reason: "CURSOR_AHEAD_OF_HISTORY" },
          );
        }
        // Up to where the feed has read, from the table; after that, from the feed.
        through = resumeFrom;
        const upTo = feed.position;
        for (let complete = false; !complete; ) {
          subscription.throwIfFailed();
          const read = await store.fetchEventsBetween(through, upTo, scope, catchUpBatch);
          for (const event of read.events) yield change(event);
          through = read.through;
          complete = read.complete;
        }
        // Retention may have deleted some of what was to be read meanwhile.
        if ((await store.feedBounds()).prunedThrough > resumeFrom) throw tooOld();
      }

      // Streams without an initial state open with a marker too: the caller
      // knows at once that it is watching, and from which cursor.
      if (!req.sendInitialState) yield response({ marker: WatchMarker.PROGRESS }, through);
      for (;;) {
        const delivery = await subscription.next(context.signal, settings.progressIntervalMs);
        if (delivery === undefined) {
          // A progress marker says "nothing has changed": not while the feed
          // cannot read the table. Reconnecting finds a healthy replica, or
          // fails visibly.
          if (feed.failing) {
            throw rpcError(
              Code.Unavailable,
              "the feed of key changes cannot read the database; reconnect with the last cursor",
              { reason: "FEED_UNAVAILABLE", retryAfterMs: 1000 },
            );
          }
          through = laterPosition(through, subscription.through);
          yield response({ marker: WatchMarker.PROGRESS }, through);
          continue;
        }
        for (const event of delivery.events) {
          if (event.position <= through) continue;
          yield change(event);
          through = event.position;
        }
        through = laterPosition(through, delivery.through);
      }
    } finally {
      subscription.close();
    }
  };
}

import { create } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  CountKeysResponseSchema,
  FetchKeyByIdResponseSchema,
  FetchKeyForUpdateResponseSchema,
  FetchKeysResponseSchema,
  FetchKeyUsageResponseSchema,
  FetchUsageReportResponseSchema,
  type KeysDriverService,
  ListKeyChangesResponseSchema,
  UpdateKeyFrozenResponseSchema,
  UpdateKeyUnfrozenResponseSchema,
} from "../../gen/keysdriver/v1/keys_driver_pb.js";
import { callStatementsOf } from "../db/client.js";
import type { CallScopedStore, FreezeOutcome, Store } from "../db/store.js";
import { invalidArgument, notFound, rpcError } from "../errors.js";
import type { KeyFeed } from "../feed/key-feed.js";
import type { Micros } from "../micros.js";
import { callerIdentityKey } from "../security/caller.js";
import type { PositionTokens } from "./cursors.js";
import { parseEtag } from "./etag.js";
import type { PageTokenCodec } from "./page-token.js";
import { reportPosition, reportRequest, reportRow } from "./report.js";
import { keySnapshot, timestampFromMicros, usageSnapshot } from "./snapshots.js";
import { optionalText, optionalTimestamp, requireNonNegative, requireTimestamp, requireUuid } from "./validate.js";
import { createWatchKeys, keyChange, type WatchSettings } from "./watch.js";

/** The page size of FetchKeys and ListKeyChanges when the caller sends 0. */
export const defaultPageSize = 50;
/** The largest page they return; larger requests are clamped to it. */
export const maxPageSize = 1000;
const maxReasonLength = 1024;
const maxActorLength = 256;

/**
 * Who made a change: the actor the caller names, or else, on mutual TLS,
 * the caller's identity from its certificate (src/security/access.ts).
 */
function actorOf(given: string, context: HandlerContext | undefined): string | null {
  const actor = optionalText("actor", given, maxActorLength);
  if (actor !== null) return actor;
  const identity = context?.values.get(callerIdentityKey);
  return identity === undefined ? null : [...identity].slice(0, maxActorLength).join("");
}
/** How far after this process's clock a freeze's frozen_at may be: clocks differ a little. */
const maxFrozenAtSkewUs = 5n * 60n * 1_000_000n;

/** A freeze's frozen_at: when it took effect, so not in the future beyond clock skew. */
function frozenAtOf(value: Timestamp | undefined): Micros | undefined {
  const us = optionalTimestamp("frozen_at", value);
  if (us !== undefined && us > BigInt(Date.now()) * 1000n + maxFrozenAtSkewUs) {
    throw invalidArgument("frozen_at", "must not be in the future (it says when the freeze took effect)");
  }
  return us;
}

function freezeResult(outcome: FreezeOutcome) {
  switch (outcome.kind) {
    case "not_found":
      throw notFound("key");
    case "frozen_before_creation":
      throw invalidArgument("frozen_at", "must not be before the key was created");
    case "stale":
      throw rpcError(Code.Aborted, "etag is stale: the key changed since it was read; nothing was written", {
        reason: "ETAG_MISMATCH",
      });
    case "done":
      return { key: keySnapshot(outcome.key), changed: outcome.changed };
  }
}

/** What the handlers are built from. */
export interface KeysDriverDeps {
  readonly store: Store;
  readonly pageTokens: PageTokenCodec;
  /** WatchKeys cursors and ListKeyChanges page tokens. */
  readonly positions: PositionTokens;
  /** The process's feed of key changes, for WatchKeys. */
  readonly feed: KeyFeed;
  readonly watch: WatchSettings;
}

/** A page size as FetchKeys and ListKeyChanges take it: 0 means the default, above the maximum the maximum. */
function pageSizeOf(requested: number): number {
  const size = requireNonNegative("page_size", requested);
  return size === 0 ? defaultPageSize : Math.min(size, maxPageSize);
}

/**
 * The KeysDriverService handlers: each validates its request, makes one store
 * call and maps rows to messages. Failures are turned into statuses, and
 * calls counted, around every handler where services are registered
 * (src/interceptors.ts).
 */
export function createKeysDriverService(deps: KeysDriverDeps) {
  const { store, pageTokens, positions } = deps;
  // The store of one call: its statements end with the call (deadline, cancel).
  const storeFor = (context: HandlerContext | undefined): Store =>
    "forCall" in store ? (store as CallScopedStore).forCall(callStatementsOf(context)) : store;
  return {
    fetchKeys: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const pageSize = pageSizeOf(req.pageSize);
      const skip = requireNonNegative("skip", req.skip);
      const cursor = req.pageToken === "" ? undefined : pageTokens.decode(tenantId, req.pageToken);
      // One extra row says whether another page exists without a count.
      const rows = await storeFor(context).fetchKeys(tenantId, { cursor, skip, limit: pageSize + 1 });
      const page = rows.slice(0, pageSize);
      const last = page.at(-1);
      const nextPageToken =
        rows.length > pageSize && last
          ? pageTokens.encode(tenantId, { createdAtUs: last.created_at_us, id: last.id })
          : "";
      return create(FetchKeysResponseSchema, { keys: page.map(keySnapshot), nextPageToken });
    },

    countKeys: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      return create(CountKeysResponseSchema, { count: await storeFor(context).countKeys(tenantId) });
    },

    fetchKeyById: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const row = await storeFor(context).fetchKeyById(tenantId, keyId);
      if (!row) throw notFound("key");
      return create(FetchKeyByIdResponseSchema, { key: keySnapshot(row) });
    },

    fetchKeyUsage: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const sinceUs = requireTimestamp("since", req.since);
      const untilUs = optionalTimestamp("until", req.until);
      if (untilUs !== undefined && sinceUs > untilUs) throw invalidArgument("since", "must not be after until");
      const row = await storeFor(context).fetchKeyUsage(tenantId, keyId, { sinceUs, untilUs });
      if (!row) throw notFound("key");
      if (row.since_us > row.until_us) {
        throw invalidArgument("since", "must not be after until (unset: the database's clock)");
      }
      return create(FetchKeyUsageResponseSchema, { usage: usageSnapshot(keyId, row) });
    },

    fetchUsageReport: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const report = reportRequest(req);
      const pageSize = pageSizeOf(req.pageSize);
      const token = req.pageToken === "" ? undefined : pageTokens.decodeReport(tenantId, report.shape, req.pageToken);
      const outcome = await storeFor(context).fetchUsageReport(tenantId, {
        ...report,
        // The window the first page fixed, when until is unset.
        untilUs: report.untilUs ?? token?.untilUs,
        after: token?.position,
        limit: pageSize + 1,
      });
      if (outcome.kind === "unknown_key") throw notFound("key");
      if (outcome.kind === "since_after_now") {
        throw invalidArgument("since", "must not be after until (unset: the database's clock)");
      }
      const { rows, untilUs } = outcome;
      const page = rows.slice(0, pageSize);
      const last = page.at(-1);
      return create(FetchUsageReportResponseSchema, {
        rows: page.map(reportRow),
        nextPageToken:
          rows.length > pageSize && last
            ? pageTokens.encodeReport(tenantId, report.shape, untilUs, reportPosition(last))
            : "",
        since: timestampFromMicros(report.sinceUs),
        until: timestampFromMicros(untilUs),
      });
    },

    fetchKeyForUpdate: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const row = await storeFor(context).fetchKeyForUpdate(tenantId, keyId);
      if (!row) throw notFound("key");
      return create(FetchKeyForUpdateResponseSchema, { key: keySnapshot(row) });
    },

    updateKeyFrozen: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const outcome = await storeFor(context).updateKeyFrozen({
        tenantId,
        keyId,
        expectedVersion: parseEtag(keyId, req.etag),
        frozenAtUs: frozenAtOf(req.frozenAt),
        reason: optionalText("reason", req.reason, maxReasonLength),
        actor: actorOf(req.actor, context),
      });
      return create(UpdateKeyFrozenResponseSchema, freezeResult(outcome));
    },

    updateKeyUnfrozen: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const outcome = await storeFor(context).updateKeyUnfrozen({
        tenantId,
        keyId,
        expectedVersion: parseEtag(keyId, req.etag),
        reason: optionalText("reason", req.reason, maxReasonLength),
        actor: actorOf(req.actor, context),
      });
      return create(UpdateKeyUnfrozenResponseSchema, freezeResult(outcome));
    },

    watchKeys: createWatchKeys(store, deps.feed, positions, deps.watch),

    listKeyChanges: async (req, context) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = req.keyId === "" ? undefined : requireUuid("key_id", req.keyId);
      const pageSize = pageSizeOf(req.pageSize);
      const before = req.pageToken === "" ? undefined : positions.positionOfPageToken(tenantId, keyId, req.pageToken);
      // Only what the feed has read through: a change listed here is one a
      // stream resuming from its cursor has passed, never one before a
      // position still being committed.
      const upTo = await deps.feed.readNow();
      const store = storeFor(context);
      const rows = await store.listKeyChanges(tenantId, { keyId, before, upTo, limit: pageSize + 1 });
      // A key with no change listed is the tenant's, or NOT_FOUND as in every
      // rpc (a deleted key's changes are still listed).
      if (keyId !== undefined && rows.length === 0 && !(await store.fetchKeyById(tenantId, keyId))) {
        throw notFound("key");
      }
      const page = rows.slice(0, pageSize);
      const last = page.at(-1);
      const scope = { allTenants: false, tenantId, keyIds: [] } as const;
      return create(ListKeyChangesResponseSchema, {
        changes: page.map((event) => keyChange(event, positions.cursor(scope, event.position))),
        nextPageToken: rows.length > pageSize && last ? positions.pageToken(tenantId, keyId, last.position) : "",
      });
    },
  } satisfies ServiceImpl<typeof KeysDriverService>;
}

/** The service's handlers, as createKeysDriverService builds them. */
export type KeysDriverHandlers = ReturnType<typeof createKeysDriverService>;

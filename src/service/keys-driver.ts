import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import {
  CountKeysResponseSchema,
  FetchKeyByIdResponseSchema,
  FetchKeyForUpdateResponseSchema,
  FetchKeysResponseSchema,
  FetchKeyUsageResponseSchema,
  type KeysDriverService,
  UpdateKeyFrozenResponseSchema,
  UpdateKeyUnfrozenResponseSchema,
} from "../../gen/keysdriver/v1/keys_driver_pb.js";
import { type ErrorLogger, invalidArgument, notFound, toConnectError } from "../errors.js";
import type { Metrics } from "../metrics.js";
import type { FreezeOutcome, KeyStore } from "../store.js";
import { parseEtag } from "./etag.js";
import type { PageTokenCodec } from "./page-token.js";
import { keySnapshot, usageSnapshot } from "./snapshots.js";
import { optionalText, optionalTimestamp, requireNonNegative, requireTimestamp, requireUuid } from "./validate.js";

/** FetchKeys' page size when the caller sends 0. */
export const defaultPageSize = 50;
/** The largest page FetchKeys returns; larger requests are clamped to it. */
export const maxPageSize = 1000;
const maxReasonLength = 1024;
const maxActorLength = 256;

/** What the service is built from. */
export interface KeysDriverDeps {
  readonly store: KeyStore;
  readonly pageTokens: PageTokenCodec;
  readonly logError?: ErrorLogger;
  /** Counts calls by method and status, when given. */
  readonly metrics?: Metrics;
}

// "InvalidArgument" → "INVALID_ARGUMENT", the names gRPC tooling shows.
const codeNames = new Map(
  Object.entries(Code)
    .filter(([, v]) => typeof v === "number")
    .map(([name, v]) => [v as Code, name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase()]),
);

function freezeResult(outcome: FreezeOutcome) {
  switch (outcome.kind) {
    case "not_found":
      throw notFound("key");
    case "stale":
      throw new ConnectError("etag is stale: the key changed since it was read; nothing was written", Code.Aborted);
    case "done":
      return { key: keySnapshot(outcome.key), changed: outcome.changed };
  }
}

/**
 * The KeysDriverService handlers. Each validates its request, makes one store
 * call and maps rows to messages; whatever escapes is turned into the status
 * the caller sees by one mapper. Unary handlers use nothing of the handler
 * context, so the gRPC transport can call them directly.
 */
export function createKeysDriverService(deps: KeysDriverDeps) {
  const { store, pageTokens, metrics, logError } = deps;
  // Every handler's failures go through one mapper, so a caller sees a
  // deliberate status or INTERNAL, never a raw database error; and every
  // call is counted here, whichever protocol brought it.
  const guard =
    <Req, Res>(method: string, handler: (req: Req) => Promise<Res>) =>
    async (req: Req): Promise<Res> => {
      const started = metrics ? performance.now() : 0;
      let code = "OK";
      try {
        return await handler(req);
      } catch (err) {
        const error = toConnectError(err, logError);
        code = codeNames.get(error.code) ?? String(error.code);
        throw error;
      } finally {
        metrics?.record(method, code, (performance.now() - started) / 1000);
      }
    };

  const service = {
    fetchKeys: guard("FetchKeys", async (req) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const requested = requireNonNegative("page_size", req.pageSize);
      const pageSize = requested === 0 ? defaultPageSize : Math.min(requested, maxPageSize);
      const skip = requireNonNegative("skip", req.skip);
      const cursor = req.pageToken === "" ? undefined : pageTokens.decode(tenantId, req.pageToken);
      // One extra row says whether another page exists without a count.
      const rows = await store.listKeys(tenantId, { cursor, skip, limit: pageSize + 1 });
      const page = rows.slice(0, pageSize);
      const last = page.at(-1);
      const nextPageToken =
        rows.length > pageSize && last
          ? pageTokens.encode(tenantId, { createdAtUs: last.created_at_us, id: last.id })
          : "";
      return create(FetchKeysResponseSchema, { keys: page.map(keySnapshot), nextPageToken });
    }),

    countKeys: guard("CountKeys", async (req) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      return create(CountKeysResponseSchema, { count: await store.countKeys(tenantId) });
    }),

    fetchKeyById: guard("FetchKeyById", async (req) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const row = await store.findKey(tenantId, keyId);
      if (!row) throw notFound("key");
      return create(FetchKeyByIdResponseSchema, { key: keySnapshot(row) });
    }),

    fetchKeyUsage: guard("FetchKeyUsage", async (req) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const sinceUs = requireTimestamp("since", req.since);
      const untilUs = optionalTimestamp("until", req.until);
      if (untilUs !== undefined && sinceUs > untilUs) throw invalidArgument("since", "must not be after until");
      const row = await store.sumUsage(tenantId, keyId, { sinceUs, untilUs });
      if (!row) throw notFound("key");
      return create(FetchKeyUsageResponseSchema, { usage: usageSnapshot(keyId, row) });
    }),

    fetchKeyForUpdate: guard("FetchKeyForUpdate", async (req) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const row = await store.findKey(tenantId, keyId);
      if (!row) throw notFound("key");
      return create(FetchKeyForUpdateResponseSchema, { key: keySnapshot(row) });
    }),

    updateKeyFrozen: guard("UpdateKeyFrozen", async (req) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const outcome = await store.freeze({
        tenantId,
        keyId,
        expectedVersion: parseEtag(keyId, req.etag),
        frozenAtUs: optionalTimestamp("frozen_at", req.frozenAt),
        reason: optionalText("reason", req.reason, maxReasonLength),
        actor: optionalText("actor", req.actor, maxActorLength),
      });
      return create(UpdateKeyFrozenResponseSchema, freezeResult(outcome));
    }),

    updateKeyUnfrozen: guard("UpdateKeyUnfrozen", async (req) => {
      const tenantId = requireUuid("tenant_id", req.tenantId);
      const keyId = requireUuid("key_id", req.keyId);
      const outcome = await store.unfreeze({
        tenantId,
        keyId,
        expectedVersion: parseEtag(keyId, req.etag),
        reason: optionalText("reason", req.reason, maxReasonLength),
        actor: optionalText("actor", req.actor, maxActorLength),
      });
      return create(UpdateKeyUnfrozenResponseSchema, freezeResult(outcome));
    }),

    // biome-ignore lint/correctness/useYield: declared in the contract, not built yet.
    async *watchKeys() {
      throw new ConnectError("WatchKeys is not implemented yet", Code.Unimplemented);
    },
  } satisfies ServiceImpl<typeof KeysDriverService>;

  return service;
}

/** The service's handlers, as createKeysDriverService builds them. */
export type KeysDriverHandlers = ReturnType<typeof createKeysDriverService>;

import type { Sql } from "./db/client.js";
import {
  countKeysByTenant,
  type FreezeChange,
  type FreezeOutcome,
  findKeyById,
  freezeKey,
  type KeyCursor,
  type KeyRow,
  listKeysByTenant,
  unfreezeKey,
} from "./db/keys.js";
import type { Micros } from "./db/time.js";
import { sumUsageSince, type UsageRow } from "./db/usage.js";

export type { FreezeChange, FreezeOutcome, KeyCursor, KeyRow, Micros, UsageRow };

/**
 * Everything the handlers need from storage, each call scoped to a tenant.
 * The service is built on this interface so that tests can hand it any store;
 * the server hands it the PostgreSQL one.
 */
export interface KeyStore {
  listKeys(
    tenantId: string,
    options: { readonly cursor?: KeyCursor; readonly skip: number; readonly limit: number },
  ): Promise<KeyRow[]>;
  countKeys(tenantId: string): Promise<bigint>;
  findKey(tenantId: string, keyId: string): Promise<KeyRow | undefined>;
  sumUsage(
    tenantId: string,
    keyId: string,
    window: { readonly sinceUs: Micros; readonly untilUs?: Micros },
  ): Promise<UsageRow | undefined>;
  freeze(change: FreezeChange & { readonly frozenAtUs?: Micros }): Promise<FreezeOutcome>;
  unfreeze(change: FreezeChange): Promise<FreezeOutcome>;
}

/** The KeyStore backed by PostgreSQL through `sql`. */
export function createPostgresStore(sql: Sql): KeyStore {
  return {
    listKeys: (tenantId, options) => listKeysByTenant(sql, tenantId, options),
    countKeys: (tenantId) => countKeysByTenant(sql, tenantId),
    findKey: (tenantId, keyId) => findKeyById(sql, tenantId, keyId),
    sumUsage: (tenantId, keyId, window) => sumUsageSince(sql, tenantId, keyId, window),
    freeze: (change) => freezeKey(sql, change),
    unfreeze: (change) => unfreezeKey(sql, change),
  };
}

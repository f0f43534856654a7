import type { EventScope } from "../db/store.js";
import { invalidArgument } from "../errors.js";
import type { TokenSigner } from "./signed-token.js";

/**
 * Positions in the feed of key changes, handed to callers as signed tokens
 * bound to what they were issued for: WatchKeys cursors to the stream's
 * scope (a tenant, or all tenants; which of a tenant's keys it filters on
 * does not matter, so a cursor may be resumed with another filter), and
 * ListKeyChanges page tokens to the tenant and key listed.
 */
export interface PositionTokens {
  /** A WatchKeys cursor at `position`. */
  cursor(scope: EventScope, position: bigint): string;
  /** The position of a WatchKeys cursor; INVALID_ARGUMENT (naming `resume_cursor`) unless issued for `scope`. */
  positionOfCursor(scope: EventScope, cursor: string): bigint;
  /** A ListKeyChanges page token for the changes before `position`. */
  pageToken(tenantId: string, keyId: string | undefined, position: bigint): string;
  /** The position of a page token; INVALID_ARGUMENT (naming `page_token`) unless issued for this query. */
  positionOfPageToken(tenantId: string, keyId: string | undefined, token: string): bigint;
}

const formatVersion = 1;

const watchContext = (scope: EventScope) =>
  scope.allTenants ? "WatchKeys\u0000*" : `WatchKeys\u0000${scope.tenantId}`;
const listContext = (tenantId: string, keyId: string | undefined) =>
  `ListKeyChanges\u0000${tenantId}\u0000${keyId ?? ""}`;

/** Position tokens signed with `signer`. */
export function createPositionTokens(signer: TokenSigner): PositionTokens {
  const encode = (context: string, position: bigint) => {
    const payload = Buffer.alloc(9);
    payload.writeUInt8(formatVersion, 0);
    payload.writeBigInt64BE(position, 1);
    return signer.sign(context, payload);
  };
  const decode = (context: string, token: string, field: string, what: string) => {
    const payload = signer.verify(context, token);
    if (payload?.length !== 9 || payload.readUInt8(0) !== formatVersion) {
      throw invalidArgument(field, `is not ${what} this service issued`, "INVALID_CURSOR");
    }
    return payload.readBigInt64BE(1);
  };
  return {
    cursor: (scope, position) => encode(watchContext(scope), position),
    positionOfCursor: (scope, cursor) =>
      decode(watchContext(scope), cursor, "resume_cursor", "a cursor for this tenant (or for all tenants) that"),
    pageToken: (tenantId, keyId, position) => encode(listContext(tenantId, keyId), position),
    positionOfPageToken: (tenantId, keyId, token) =>
      decode(listContext(tenantId, keyId), token, "page_token", "a page token for this tenant and key that"),
  };
}

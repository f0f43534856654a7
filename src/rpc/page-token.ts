import type { KeyCursor } from "../db/store.js";
import { invalidArgument } from "../errors.js";
import type { TokenSigner } from "./signed-token.js";

// A FetchKeys page token's payload: format version (1 byte), created_at in
// micros (int64, big-endian), key id (16 bytes); signed together with the
// tenant it was issued for. It is a keyset position, never an offset.
const formatVersion = 1;
const payloadLength = 1 + 8 + 16;

/** Issues and checks FetchKeys page tokens. */
export interface PageTokenCodec {
  /** The token for the page that starts after `cursor`. */
  encode(tenantId: string, cursor: KeyCursor): string;
  /** The cursor in `token`; INVALID_ARGUMENT unless this service issued it for `tenantId`. */
  decode(tenantId: string, token: string): KeyCursor;
}

function uuidToBytes(id: string): Buffer {
  return Buffer.from(id.replaceAll("-", ""), "hex");
}

function bytesToUuid(bytes: Buffer): string {
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// Bound into every token: the rpc and the request parameters that shape the
// list (today only the tenant), so a token cannot be replayed elsewhere.
const context = (tenantId: string) => `FetchKeys\u0000${tenantId}`;

/** A codec that signs with `signer`. */
export function createPageTokenCodec(signer: TokenSigner): PageTokenCodec {
  return {
    encode(tenantId, cursor) {
      const payload = Buffer.alloc(payloadLength);
      payload.writeUInt8(formatVersion, 0);
      payload.writeBigInt64BE(cursor.createdAtUs, 1);
      uuidToBytes(cursor.id).copy(payload, 9);
      return signer.sign(context(tenantId), payload);
    },
    decode(tenantId, token) {
      const payload = signer.verify(context(tenantId), token);
      if (!payload || payload.length !== payloadLength || payload.readUInt8(0) !== formatVersion) {
        throw invalidArgument(
          "page_token",
          "is not a page token this service issued for this tenant and query",
          "INVALID_PAGE_TOKEN",
        );
      }
      return { createdAtUs: payload.readBigInt64BE(1), id: bytesToUuid(payload.subarray(9, 25)) };
    },
  };
}

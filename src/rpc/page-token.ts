import { createHmac, timingSafeEqual } from "node:crypto";
import type { KeyCursor } from "../db/store.js";
import { invalidArgument } from "../errors.js";

// Layout before base64url: format version (1 byte), created_at in micros
// (int64, big-endian), key id (16 bytes), then a 16-byte HMAC-SHA256 over the
// bytes before it and the tenant and query it was issued for. The token is
// a keyset position, never an offset; the MAC makes an edited token, or a
// token from another tenant, detectable.
const formatVersion = 1;
const payloadLength = 1 + 8 + 16;
const macLength = 16;

/** Issues and checks FetchKeys page tokens with one secret. */
export interface PageTokenCodec {
  /** The token for the page that starts after `cursor`. */
  encode(tenantId: string, cursor: KeyCursor): string;
  /** The cursor in `token`; INVALID_ARGUMENT unless this codec issued it for `tenantId`. */
  decode(tenantId: string, token: string): KeyCursor;
}

function uuidToBytes(id: string): Buffer {
  return Buffer.from(id.replaceAll("-", ""), "hex");
}

function bytesToUuid(bytes: Buffer): string {
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** A codec signing with `secret` (32 bytes or more). */
export function createPageTokenCodec(secret: Uint8Array): PageTokenCodec {
  if (secret.length < 32) throw new Error("page token secret must be at least 32 bytes");
  const key = Buffer.from(secret);
  // Bound into every token: the rpc and the request parameters that shape the
  // list (today only the tenant), so a token cannot be replayed elsewhere.
  const mac = (tenantId: string, payload: Buffer) =>
    createHmac("sha256", key).update(payload).update(`FetchKeys\u0000${tenantId}`).digest().subarray(0, macLength);

  return {
    encode(tenantId, cursor) {
      const payload = Buffer.alloc(payloadLength);
      payload.writeUInt8(formatVersion, 0);
      payload.writeBigInt64BE(cursor.createdAtUs, 1);
      uuidToBytes(cursor.id).copy(payload, 9);
      return Buffer.concat([payload, mac(tenantId, payload)]).toString("base64url");
    },
    decode(tenantId, token) {
      const bytes = /^[A-Za-z0-9_-]+$/.test(token) ? Buffer.from(token, "base64url") : Buffer.alloc(0);
      if (bytes.length !== payloadLength + macLength || bytes.readUInt8(0) !== formatVersion) {
        throw invalidArgument("page_token", "is not a token this service issued");
      }
      const payload = bytes.subarray(0, payloadLength);
      if (!timingSafeEqual(bytes.subarray(payloadLength), mac(tenantId, payload))) {
        throw invalidArgument("page_token", "was altered or issued for another tenant or query");
      }
      return { createdAtUs: payload.readBigInt64BE(1), id: bytesToUuid(payload.subarray(9, 25)) };
    },
  };
}

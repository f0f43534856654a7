import type { KeyCursor, Micros, ReportPosition } from "../db/store.js";
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
  /**
   * The token for the FetchUsageReport page after `position`, in the report
   * `shape` (the request's every other field, canonical) over a window
   * ending at `untilUs`.
   */
  encodeReport(tenantId: string, shape: string, untilUs: Micros, position: ReportPosition): string;
  /** What encodeReport put in `token`; INVALID_ARGUMENT unless issued for this tenant and shape. */
  decodeReport(tenantId: string, shape: string, token: string): { untilUs: Micros; position: ReportPosition };
}

// A FetchUsageReport page token's payload: format version (1 byte), the
// window's end and the last row's bucket in micros (int64 each), its key
// (16 bytes), the length of its model in bytes (uint32) and the model, then
// its exact spend (ASCII), all signed with the tenant and the report's shape.
const reportPrefixLength = 1 + 8 + 8 + 16 + 4;

const invalidPageToken = () =>
  invalidArgument(
    "page_token",
    "is not a page token this service issued for this tenant and query",
    "INVALID_PAGE_TOKEN",
  );

function uuidToBytes(id: string): Buffer {
  return Buffer.from(id.replaceAll("-", ""), "hex");
}

function bytesToUuid(bytes: Buffer): string {
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

const reportContext = (tenantId: string, shape: string) => `FetchUsageReport\u0000${tenantId}\u0000${shape}`;

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
        throw invalidPageToken();
      }
      return { createdAtUs: payload.readBigInt64BE(1), id: bytesToUuid(payload.subarray(9, 25)) };
    },
    encodeReport(tenantId, shape, untilUs, position) {
      const model = Buffer.from(position.model, "utf8");
      const spend = Buffer.from(position.spendExact, "ascii");
      const payload = Buffer.alloc(reportPrefixLength + model.length + spend.length);
      payload.writeUInt8(formatVersion, 0);
      payload.writeBigInt64BE(untilUs, 1);
      payload.writeBigInt64BE(position.bucketUs, 9);
      uuidToBytes(position.keyId).copy(payload, 17);
      payload.writeUInt32BE(model.length, 33);
      model.copy(payload, reportPrefixLength);
      spend.copy(payload, reportPrefixLength + model.length);
      return signer.sign(reportContext(tenantId, shape), payload);
    },
    decodeReport(tenantId, shape, token) {
      const payload = signer.verify(reportContext(tenantId, shape), token);
      if (!payload || payload.length < reportPrefixLength || payload.readUInt8(0) !== formatVersion) {
        throw invalidPageToken();
      }
      const modelEnd = reportPrefixLength + payload.readUInt32BE(33);
      if (modelEnd > payload.length) throw invalidPageToken();
      return {
        untilUs: payload.readBigInt64BE(1),
        position: {
          bucketUs: payload.readBigInt64BE(9),
          keyId: bytesToUuid(payload.subarray(17, 33)),
          model: payload.subarray(reportPrefixLength, modelEnd).toString("utf8"),
          spendExact: payload.subarray(modelEnd).toString("ascii"),
        },
      };
    },
  };
}

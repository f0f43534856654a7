import { createHmac, timingSafeEqual } from "node:crypto";

/**
 * Opaque tokens the service hands out and takes back (page tokens, feed
 * cursors): a payload, then an HMAC-SHA256 (truncated to 16 bytes) over the
 * payload and the context it was issued for (the rpc and the parameters that
 * shape it), base64url-encoded. An edited token, or one issued for another
 * context, fails the check.
 */
export interface TokenSigner {
  sign(context: string, payload: Buffer): string;
  /** The payload, or undefined when the token is not one this signer issued for `context`. */
  verify(context: string, token: string): Buffer | undefined;
}

const macLength = 16;

/** A signer with `secret` (32 bytes or more). */
export function createTokenSigner(secret: Uint8Array): TokenSigner {
  if (secret.length < 32) throw new Error("token secret must be at least 32 bytes");
  const key = Buffer.from(secret);
  const mac = (context: string, payload: Buffer) =>
    createHmac("sha256", key).update(payload).update(context).digest().subarray(0, macLength);
  return {
    sign(context, payload) {
      return Buffer.concat([payload, mac(context, payload)]).toString("base64url");
    },
    verify(context, token) {
      // Canonical base64url only: Node's decoder ignores stray bits in the
      // last character, which would let a token be edited unnoticed.
      if (!/^[A-Za-z0-9_-]+$/.test(token)) return undefined;
      const bytes = Buffer.from(token, "base64url");
      if (bytes.length <= macLength || bytes.toString("base64url") !== token) return undefined;
      const payload = bytes.subarray(0, bytes.length - macLength);
      return timingSafeEqual(bytes.subarray(payload.length), mac(context, payload)) ? payload : undefined;
    },
  };
}

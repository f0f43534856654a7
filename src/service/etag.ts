import { createHash } from "node:crypto";
import { invalidArgument } from "../errors.js";

// An etag names a version of one key: "<version>.<tag>", where the tag ties
// it to the key, so an etag taken from another key is refused instead of
// matching that key's version number by accident.
function tag(keyId: string, version: bigint): string {
  return createHash("sha256").update(`${keyId}/${version}`).digest("base64url").slice(0, 10);
}

/** The etag of `keyId` at `version`. */
export function formatEtag(keyId: string, version: bigint): string {
  return `${version}.${tag(keyId, version)}`;
}

/**
 * The version an etag names, or undefined when the caller sent none.
 * INVALID_ARGUMENT when it is not an etag this service issued for the key.
 */
export function parseEtag(keyId: string, etag: string): bigint | undefined {
  if (etag === "") return undefined;
  const match = /^(\d{1,19})\.([A-Za-z0-9_-]{10})$/.exec(etag);
  const version = match?.[1] === undefined ? undefined : BigInt(match[1]);
  if (version === undefined || match?.[2] !== tag(keyId, version)) {
    throw invalidArgument("etag", "is not an etag of this key (take it from FetchKeyForUpdate)");
  }
  return version;
}

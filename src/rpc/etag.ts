import { invalidArgument } from "../errors.js";

// An etag names a version of one key: "<version>.<tag>", where the tag ties
// it to the key, so an etag taken from another key is refused instead of
// matching that key's version number by accident. The tag guards against
// mistakes, not attackers (the version check is what protects the write),
// so a fast 32-bit FNV-1a hash is enough; it runs for every snapshot.
function tag(keyId: string, version: bigint): string {
  const text = `${keyId}/${version}`;
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return (hash >>> 0).toString(36).padStart(7, "0");
}

const maxVersion = 9_223_372_036_854_775_807n;

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
  const match = /^(\d{1,19})\.([0-9a-z]{7})$/.exec(etag);
  const version = match?.[1] === undefined ? undefined : BigInt(match[1]);
  // A version is an int8 in the database: no etag of this service names a larger one.
  if (version === undefined || version > maxVersion || match?.[2] !== tag(keyId, version)) {
    throw invalidArgument("etag", "is not an etag of this key (take it from FetchKeyForUpdate)", "INVALID_ETAG");
  }
  return version;
}

import type { PeerCertificate } from "node:tls";
import { createContextKey } from "@connectrpc/connect";

/**
 * Who is calling, as the connection's TLS says: what the caller's
 * certificate names (its subject alternative names) and whether the
 * certificate was issued by the CA this service trusts.
 */
export interface TlsPeer {
  /** The connection is TLS and its client certificate chains to TLS_CLIENT_CA_FILE. */
  readonly authorized: boolean;
  /** The certificate the client presented, when it presented one that was verified. */
  certificate(): PeerCertificate | undefined;
}

/**
 * The TLS side of a call, set by the transport that received it (src/server.ts,
 * src/transport/grpc.ts); undefined on a plaintext connection.
 */
export const tlsPeerKey = createContextKey<TlsPeer | undefined>(undefined, { description: "the call's TLS peer" });

/** The caller's identity once access control has checked it: what the actor of a change defaults to. */
export const callerIdentityKey = createContextKey<string | undefined>(undefined, {
  description: "the caller's identity from its certificate",
});

/** What a socket (or HTTP/2's proxy of one) offers when it is TLS. */
interface TlsSocketLike {
  readonly authorized?: boolean;
  readonly authorizationError?: Error | null;
  getPeerCertificate?(detailed?: boolean): PeerCertificate;
}

/** The TLS peer of a socket, or undefined when the socket is not TLS. */
export function tlsPeerOfSocket(socket: unknown): TlsPeer | undefined {
  const tls = socket as TlsSocketLike | undefined;
  if (typeof tls?.getPeerCertificate !== "function") return undefined;
  const authorized = tls.authorized === true && !tls.authorizationError;
  return {
    authorized,
    certificate: () => (authorized ? tls.getPeerCertificate?.() : undefined),
  };
}

/**
 * The identity a certificate gives its holder: its first URI name (a
 * SPIFFE id), or, without one, its first DNS name (in lower case: DNS names
 * are case-insensitive); undefined with neither.
 */
export function identityOf(certificate: PeerCertificate | undefined): string | undefined {
  const names = namesOf(certificate);
  return names.uris[0] ?? names.dnsNames[0]?.toLowerCase();
}

/**
 * The URI and DNS names of a certificate. Node writes
 * subjectaltname as `URI:spiffe://a/b, DNS:x.example`, quoting (as JSON) a
 * value with a comma, quote or other unusual character in it.
 */
function namesOf(certificate: PeerCertificate | undefined): { uris: string[]; dnsNames: string[] } {
  const text = certificate?.subjectaltname;
  if (!text) return { uris: [], dnsNames: [] };
  const uris: string[] = [];
  const dnsNames: string[] = [];
  // Every entry, of every kind (IP Address, email, ...), so that none stops the scan.
  const entry = /([A-Za-z ]+):("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)/gy;
  let match = entry.exec(text);
  while (match) {
    const [, kind, raw = ""] = match;
    let value = raw;
    if (raw.startsWith('"')) {
      try {
        value = JSON.parse(raw) as string;
      } catch {
        value = "";
      }
    }
    if (value !== "" && kind === "URI") uris.push(value);
    else if (value !== "" && kind === "DNS") dnsNames.push(value);
    match = entry.exec(text);
  }
  return { uris, dnsNames };
}

import "reflect-metadata";
import type { webcrypto } from "node:crypto";
import { mkdtemp, rename, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import * as x509 from "@peculiar/x509";

// Certificates made by the tests: a CA, the server's certificate for
// 127.0.0.1, and client certificates naming their holder the way a mesh
// does (a SPIFFE URI) or the way a plain PKI does (a DNS name).

const algorithm = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;
const day = 86_400_000;

/** A PEM certificate and its PEM private key. */
export interface Issued {
  readonly cert: string;
  readonly key: string;
}

/** A certificate authority that can issue certificates. */
export interface TestCa extends Issued {
  issue(options: IssueOptions): Promise<Issued>;
}

export interface IssueOptions {
  /** URI names (SPIFFE ids). */
  readonly uris?: readonly string[];
  readonly dnsNames?: readonly string[];
  readonly ips?: readonly string[];
  /** For the server's certificate. */
  readonly server?: boolean;
  /** Valid from now - 1 minute until this; default a day from now. */
  readonly notAfter?: Date;
  readonly notBefore?: Date;
}

async function pemKey(key: webcrypto.CryptoKey): Promise<string> {
  const der = Buffer.from(await crypto.subtle.exportKey("pkcs8", key));
  const lines = der.toString("base64").match(/.{1,64}/g) ?? [];
  return `-----BEGIN PRIVATE KEY-----\n${lines.join("\n")}\n-----END PRIVATE KEY-----\n`;
}

let serial = 1;
const nextSerial = () => (serial++).toString(16).padStart(2, "0");

/** A new CA named `name`. */
export async function createTestCa(name: string): Promise<TestCa> {
  const keys = await crypto.subtle.generateKey(algorithm, true, ["sign", "verify"]);
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: nextSerial(),
    name: `CN=${name}`,
    notBefore: new Date(Date.now() - day),
    notAfter: new Date(Date.now() + 30 * day),
    keys,
    signingAlgorithm: algorithm,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return {
    cert: ca.toString("pem"),
    key: await pemKey(keys.privateKey),
    async issue(options) {
      const own = await crypto.subtle.generateKey(algorithm, true, ["sign", "verify"]);
      const names: x509.JsonGeneralName[] = [
        ...(options.uris ?? []).map((value) => ({ type: "url" as const, value })),
        ...(options.dnsNames ?? []).map((value) => ({ type: "dns" as const, value })),
        ...(options.ips ?? []).map((value) => ({ type: "ip" as const, value })),
      ];
      const cert = await x509.X509CertificateGenerator.create({
        serialNumber: nextSerial(),
        subject: `CN=${options.dnsNames?.[0] ?? options.uris?.[0] ?? "test"}`.replaceAll(",", ""),
        issuer: ca.subject,
        notBefore: options.notBefore ?? new Date(Date.now() - 60_000),
        notAfter: options.notAfter ?? new Date(Date.now() + day),
        signingKey: keys.privateKey,
        publicKey: own.publicKey,
        signingAlgorithm: algorithm,
        extensions: [
          new x509.BasicConstraintsExtension(false, undefined, true),
          new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
          new x509.ExtendedKeyUsageExtension([options.server ? "1.3.6.1.5.5.7.3.1" : "1.3.6.1.5.5.7.3.2"]),
          ...(names.length > 0 ? [new x509.SubjectAlternativeNameExtension(names)] : []),
          await x509.AuthorityKeyIdentifierExtension.create(keys.publicKey),
        ],
      });
      return { cert: cert.toString("pem"), key: await pemKey(own.privateKey) };
    },
  };
}

/** A folder for the service's files, removed by the returned function. */
export async function tempFolder(): Promise<{
  dir: string;
  write(name: string, text: string): Promise<string>;
  remove(): Promise<void>;
}> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "keys-driver-tls-"));
  return {
    dir,
    async write(name, text) {
      const file = path.join(dir, name);
      // Written aside and renamed, so that a reload never reads half a file.
      await writeFile(`${file}.new`, text);
      await rename(`${file}.new`, file);
      return file;
    },
    remove: () => rm(dir, { recursive: true, force: true }),
  };
}

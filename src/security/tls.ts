import { readFile } from "node:fs/promises";
import tls from "node:tls";
import type { DescService } from "@bufbuild/protobuf";
import { ConfigError } from "../config.js";
import { AccessPolicy, PolicyError } from "./access.js";

/** Where the service's TLS material lives (TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE). */
export interface TlsFiles {
  /** PEM certificate chain the service presents. */
  readonly certFile: string;
  /** PEM private key of that certificate. */
  readonly keyFile: string;
  /** PEM CA certificates that client certificates must chain to; set = mutual TLS. */
  readonly clientCaFile: string | undefined;
}

/** What the listener needs to serve TLS. */
export interface TlsMaterial {
  readonly options: tls.SecureContextOptions;
  /** Ask every client for a certificate (mutual TLS). */
  readonly requestCert: boolean;
}

async function readVariable(variable: string, path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    throw new ConfigError(variable, `names ${path}, which cannot be read (${(err as NodeJS.ErrnoException).code})`);
  }
}

/** Reads and checks the certificate, key and client CA; a problem names its variable. */
export async function readTlsMaterial(files: TlsFiles): Promise<TlsMaterial> {
  const [cert, key, ca] = await Promise.all([
    readVariable("TLS_CERT_FILE", files.certFile),
    readVariable("TLS_KEY_FILE", files.keyFile),
    files.clientCaFile === undefined ? undefined : readVariable("TLS_CLIENT_CA_FILE", files.clientCaFile),
  ]);
  const options: tls.SecureContextOptions = { cert, key, ...(ca ? { ca } : {}) };
  try {
    tls.createSecureContext({ cert, key });
  } catch (err) {
    throw new ConfigError(
      "TLS_CERT_FILE",
      `and TLS_KEY_FILE are not a PEM certificate and its key (${(err as Error).message})`,
    );
  }
  if (ca) {
    try {
      tls.createSecureContext({ ca });
    } catch (err) {
      throw new ConfigError("TLS_CLIENT_CA_FILE", `is not PEM CA certificates (${(err as Error).message})`);
    }
    if (!ca.toString("latin1").includes("-----BEGIN CERTIFICATE-----"))
      throw new ConfigError("TLS_CLIENT_CA_FILE", "holds no PEM certificate");
  }
  return { options, requestCert: ca !== undefined };
}

/** Reads AUTH_POLICY_FILE (src/security/access.ts); a problem names the variable. */
export async function readAccessPolicy(path: string, services: readonly DescService[]): Promise<AccessPolicy> {
  const text = await readVariable("AUTH_POLICY_FILE", path);
  try {
    return AccessPolicy.parse(text.toString("utf8"), services);
  } catch (err) {
    if (err instanceof PolicyError) throw new ConfigError("AUTH_POLICY_FILE", err.message);
    throw err;
  }
}

/**
 * Polls files for a change of content (a renewed certificate, an edited
 * policy; a Kubernetes secret's symlink swap included) and calls `reload`
 * after one. What reload throws goes to `onError`, and what was in use
 * stays in use. Resolves once the files' present content is known.
 */
export async function watchFiles(
  paths: readonly string[],
  intervalMs: number,
  reload: () => Promise<void>,
  onError: (err: unknown) => void,
): Promise<{ close(): void }> {
  const contents = () => Promise.all(paths.map((p) => readFile(p).catch(() => Buffer.alloc(0))));
  // Taken before the caller reads the files: a change after this is reloaded.
  let last = await contents();
  let running = false;
  const poll = async () => {
    if (running) return;
    running = true;
    try {
      const now = await contents();
      const changed = now.some((c, i) => !c.equals(last[i] ?? Buffer.alloc(0)));
      last = now;
      if (changed) await reload();
    } catch (err) {
      onError(err);
    } finally {
      running = false;
    }
  };
  const timer = setInterval(poll, intervalMs);
  timer.unref();
  return { close: () => clearInterval(timer) };
}

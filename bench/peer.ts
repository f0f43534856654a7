// The reference peer: what a team would write by hand instead of this
// service. A plain @grpc/grpc-js server with @grpc/proto-loader (protobufjs)
// that runs the same SQL functions as the service, on the same pool
// settings, with only the validation it cannot do without. Env: DATABASE_URL,
// PORT. Prints "listening <port>" when ready.
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { createSql } from "../src/db/client.js";
import { fetchKeyById, fetchKeys, type KeyRow, updateKeyFrozen, updateKeyUnfrozen } from "../src/db/keys.js";
import { findServiceSecret } from "../src/db/secrets.js";
import { fetchKeyUsage } from "../src/db/usage.js";
import { createPageTokenCodec } from "../src/rpc/page-token.js";
import { createTokenSigner } from "../src/rpc/signed-token.js";

const sql = createSql({ url: process.env.DATABASE_URL ?? "", poolMax: 10, statementTimeoutMs: 10_000 });
const secret = await findServiceSecret(sql, "page_token");
if (!secret) throw new Error("no page token secret");
const tokens = createPageTokenCodec(createTokenSigner(secret));

const definition = protoLoader.loadSync(
  [path.resolve("proto/keysdriver/v1/keys_driver.proto"), path.resolve("proto/grpc/health/v1/health.proto")],
  { includeDirs: [path.resolve("proto")], longs: String, enums: String, defaults: false },
);
type Loaded = {
  keysdriver: { v1: { KeysDriverService: grpc.ServiceClientConstructor } };
  grpc: { health: { v1: { Health: grpc.ServiceClientConstructor } } };
};
const loaded = grpc.loadPackageDefinition(definition) as unknown as Loaded;

const ts = (us: bigint | null) =>
  us === null ? null : { seconds: (us / 1_000_000n).toString(), nanos: Number(us % 1_000_000n) * 1000 };
const status = { active: "KEY_STATUS_ACTIVE", revoked: "KEY_STATUS_REVOKED", expired: "KEY_STATUS_EXPIRED" };
const snapshot = (r: KeyRow) => ({
  id: r.id,
  tenantId: r.tenant_id,
  name: r.name,
  keyPrefix: r.key_prefix,
  status: status[r.status],
  isFrozen: r.is_frozen,
  frozenAt: ts(r.frozen_at_us),
  createdAt: ts(r.created_at_us),
  lastUsedAt: ts(r.last_used_at_us),
  expiresAt: ts(r.expires_at_us),
  totalRequests: r.total_requests.toString(),
  etag: r.version.toString(),
});
// proto-loader leaves zero fields out (defaults: false).
const micros = (t: { seconds?: string; nanos?: number }) =>
  BigInt(t.seconds ?? 0) * 1_000_000n + BigInt(Math.floor((t.nanos ?? 0) / 1000));

interface Req {
  tenantId: string;
  keyId: string;
  pageSize: number;
  pageToken: string;
  skip: number;
  since: { seconds: string; nanos: number };
  until?: { seconds: string; nanos: number };
}
function unary(work: (req: Req) => Promise<unknown>): grpc.handleUnaryCall<Req, unknown> {
  return (call, callback) => {
    work(call.request).then(
      (res) =>
        res === undefined ? callback({ code: grpc.status.NOT_FOUND, details: "key not found" }) : callback(null, res),
      (err: Error) => callback({ code: grpc.status.INTERNAL, details: err.message }),
    );
  };
}

const server = new grpc.Server();
server.addService(loaded.grpc.health.v1.Health.service, {
  check: unary(async () => ({ status: "SERVING" })),
});
server.addService(loaded.keysdriver.v1.KeysDriverService.service, {
  fetchKeyById: unary(async (req) => {
    const row = await fetchKeyById(sql, req.tenantId, req.keyId);
    return row && { key: snapshot(row) };
  }),
  fetchKeys: unary(async (req) => {
    const size = req.pageSize || 50;
    const cursor = req.pageToken ? tokens.decode(req.tenantId, req.pageToken) : undefined;
    const rows = await fetchKeys(sql, req.tenantId, { cursor, skip: req.skip || 0, limit: size + 1 });
    const page = rows.slice(0, size);
    const last = page.at(-1);
    return {
      keys: page.map(snapshot),
      nextPageToken:
        rows.length > size && last ? tokens.encode(req.tenantId, { createdAtUs: last.created_at_us, id: last.id }) : "",
    };
  }),
  fetchKeyUsage: unary(async (req) => {
    const row = await fetchKeyUsage(sql, req.tenantId, req.keyId, {
      sinceUs: micros(req.since),
      untilUs: req.until ? micros(req.until) : undefined,
    });
    return (
      row && {
        usage: {
          keyId: req.keyId,
          since: ts(row.since_us),
          until: ts(row.until_us),
          requestCount: row.request_count.toString(),
          spendCents: row.spend_cents.toString(),
          spendCentsExact: row.spend_cents_exact,
        },
      }
    );
  }),
  updateKeyFrozen: unary(async (req) => {
    const out = await updateKeyFrozen(sql, { tenantId: req.tenantId, keyId: req.keyId, reason: null, actor: null });
    return out.kind === "done" ? { key: snapshot(out.key), changed: out.changed } : undefined;
  }),
  updateKeyUnfrozen: unary(async (req) => {
    const out = await updateKeyUnfrozen(sql, { tenantId: req.tenantId, keyId: req.keyId, reason: null, actor: null });
    return out.kind === "done" ? { key: snapshot(out.key), changed: out.changed } : undefined;
  }),
});
server.bindAsync(`127.0.0.1:${process.env.PORT ?? "0"}`, grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) throw err;
  console.log(`listening ${port}`);
});
process.on("SIGTERM", () => server.tryShutdown(() => sql.end().then(() => process.exit(0))));

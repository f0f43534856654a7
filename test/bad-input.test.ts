// The bad-input table: requests a caller gets wrong, across every rpc, each
// answered with its status and the field it names, nothing written, and the
// server healthy after; on the gRPC protocol and on the Connect protocol.
import { randomUUID } from "node:crypto";
import type { JsonObject } from "@bufbuild/protobuf";
import { Code, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { expect } from "chai";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { formatEtag } from "../src/rpc/etag.js";
import { connectProtocolCaller, failure, grpcJsCaller, type JsonCaller } from "./support/clients.js";
import { insertCalls, insertKey, newTenant } from "./support/fixtures.js";
import { recordObservation } from "./support/record.js";
import { useTestService } from "./support/service.js";

/** One row of the table: a request, the status it gets, and what its message names. */
interface BadInput {
  readonly rpc: string;
  readonly what: string;
  readonly request: () => JsonObject;
  readonly code: Code;
  readonly names: string;
  /** For streams: read the stream to its end. */
  readonly stream?: boolean;
}

describe("the bad-input table", () => {
  const service = useTestService();
  // The tenant and key the requests use, another tenant's key, and tokens of each.
  const t = newTenant();
  const other = newTenant();
  let key = "";
  let theirs = "";
  let pageToken = "";
  let theirToken = "";

  before(async () => {
    key = await insertKey(service.db.sql, { tenantId: t });
    await insertKey(service.db.sql, { tenantId: t });
    theirs = await insertKey(service.db.sql, { tenantId: other });
    await insertKey(service.db.sql, { tenantId: other });
    await insertCalls(service.db.sql, t, key, [{ costCents: "1.5", at: "2026-05-01 00:00:00+00" }]);
    const caller = grpcJsCaller(service.server.address);
    pageToken = (await caller.call("FetchKeys", { tenantId: t, pageSize: 1 })).nextPageToken as string;
    theirToken = (await caller.call("FetchKeys", { tenantId: other, pageSize: 1 })).nextPageToken as string;
    caller.close();
  });

  const edited = (token: string) => `${token.slice(0, -1)}${token.endsWith("A") ? "B" : "A"}`;
  const since = "2026-01-01T00:00:00Z";
  const cases: BadInput[] = [
    // FetchKeys
    { rpc: "FetchKeys", what: "no tenant", request: () => ({}), code: Code.InvalidArgument, names: "tenant_id" },
    {
      rpc: "FetchKeys",
      what: "tenant not a UUID",
      request: () => ({ tenantId: "acme" }),
      code: Code.InvalidArgument,
      names: "tenant_id",
    },
    {
      rpc: "FetchKeys",
      what: "tenant with a NUL",
      request: () => ({ tenantId: `${t}\u0000` }),
      code: Code.InvalidArgument,
      names: "tenant_id",
    },
    {
      rpc: "FetchKeys",
      what: "negative page size",
      request: () => ({ tenantId: t, pageSize: -1 }),
      code: Code.InvalidArgument,
      names: "page_size",
    },
    {
      rpc: "FetchKeys",
      what: "negative skip",
      request: () => ({ tenantId: t, skip: -1 }),
      code: Code.InvalidArgument,
      names: "skip",
    },
    {
      rpc: "FetchKeys",
      what: "forged page token",
      request: () => ({ tenantId: t, pageToken: "forged" }),
      code: Code.InvalidArgument,
      names: "page_token",
    },
    {
      rpc: "FetchKeys",
      what: "page token's last character edited",
      request: () => ({ tenantId: t, pageToken: edited(pageToken) }),
      code: Code.InvalidArgument,
      names: "page_token",
    },
    {
      rpc: "FetchKeys",
      what: "another tenant's page token",
      request: () => ({ tenantId: t, pageToken: theirToken }),
      code: Code.InvalidArgument,
      names: "page_token",
    },
    {
      rpc: "FetchKeys",
      what: "a 100 kB page token",
      request: () => ({ tenantId: t, pageToken: "A".repeat(100_000) }),
      code: Code.InvalidArgument,
      names: "page_token",
    },
    // CountKeys
    { rpc: "CountKeys", what: "no tenant", request: () => ({}), code: Code.InvalidArgument, names: "tenant_id" },
    {
      rpc: "CountKeys",
      what: "tenant of 5 kB",
      request: () => ({ tenantId: "x".repeat(5000) }),
      code: Code.InvalidArgument,
      names: "tenant_id",
    },
    // FetchKeyById
    {
      rpc: "FetchKeyById",
      what: "no key",
      request: () => ({ tenantId: t }),
      code: Code.InvalidArgument,
      names: "key_id",
    },
    {
      rpc: "FetchKeyById",
      what: "key with spaces",
      request: () => ({ tenantId: t, keyId: ` ${key} ` }),
      code: Code.InvalidArgument,
      names: "key_id",
    },
    {
      rpc: "FetchKeyById",
      what: "key of 4-byte characters",
      request: () => ({ tenantId: t, keyId: "\u{1F511}".repeat(36) }),
      code: Code.InvalidArgument,
      names: "key_id",
    },
    {
      rpc: "FetchKeyById",
      what: "another tenant's key",
      request: () => ({ tenantId: t, keyId: theirs }),
      code: Code.NotFound,
      names: "key",
    },
    {
      rpc: "FetchKeyById",
      what: "a key nobody has",
      request: () => ({ tenantId: t, keyId: randomUUID() }),
      code: Code.NotFound,
      names: "key",
    },
    // FetchKeyUsage
    {
      rpc: "FetchKeyUsage",
      what: "no since",
      request: () => ({ tenantId: t, keyId: key }),
      code: Code.InvalidArgument,
      names: "since",
    },
    {
      rpc: "FetchKeyUsage",
      what: "since after until",
      request: () => ({ tenantId: t, keyId: key, since: "2026-05-02T00:00:00Z", until: "2026-05-01T00:00:00Z" }),
      code: Code.InvalidArgument,
      names: "since",
    },
    {
      rpc: "FetchKeyUsage",
      what: "since after now, no until",
      request: () => ({ tenantId: t, keyId: key, since: "9999-12-31T00:00:00Z" }),
      code: Code.InvalidArgument,
      names: "since",
    },
    {
      rpc: "FetchKeyUsage",
      what: "another tenant's key",
      request: () => ({ tenantId: t, keyId: theirs, since }),
      code: Code.NotFound,
      names: "key",
    },
    // FetchKeyForUpdate
    {
      rpc: "FetchKeyForUpdate",
      what: "key not a UUID",
      request: () => ({ tenantId: t, keyId: "key-1" }),
      code: Code.InvalidArgument,
      names: "key_id",
    },
    {
      rpc: "FetchKeyForUpdate",
      what: "another tenant's key",
      request: () => ({ tenantId: t, keyId: theirs }),
      code: Code.NotFound,
      names: "key",
    },
    // UpdateKeyFrozen
    {
      rpc: "UpdateKeyFrozen",
      what: "reason of 1,025 characters",
      request: () => ({ tenantId: t, keyId: key, reason: "\u{1F511}".repeat(1025) }),
      code: Code.InvalidArgument,
      names: "reason",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "reason with a NUL",
      request: () => ({ tenantId: t, keyId: key, reason: "a\u0000b" }),
      code: Code.InvalidArgument,
      names: "reason",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "actor of 257 characters",
      request: () => ({ tenantId: t, keyId: key, actor: "a".repeat(257) }),
      code: Code.InvalidArgument,
      names: "actor",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "frozen_at in an hour",
      request: () => ({ tenantId: t, keyId: key, frozenAt: new Date(Date.now() + 3_600_000).toISOString() }),
      code: Code.InvalidArgument,
      names: "frozen_at",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "frozen_at before the key was created",
      request: () => ({ tenantId: t, keyId: key, frozenAt: "1970-01-01T00:00:00Z" }),
      code: Code.InvalidArgument,
      names: "frozen_at",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "malformed etag",
      request: () => ({ tenantId: t, keyId: key, etag: "1" }),
      code: Code.InvalidArgument,
      names: "etag",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "another key's etag",
      request: () => ({ tenantId: t, keyId: key, etag: formatEtag(theirs, 1n) }),
      code: Code.InvalidArgument,
      names: "etag",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "etag past int8",
      request: () => ({ tenantId: t, keyId: key, etag: formatEtag(key, 9_999_999_999_999_999_999n) }),
      code: Code.InvalidArgument,
      names: "etag",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "stale etag",
      request: () => ({ tenantId: t, keyId: key, etag: formatEtag(key, 999n) }),
      code: Code.Aborted,
      names: "etag",
    },
    {
      rpc: "UpdateKeyFrozen",
      what: "another tenant's key",
      request: () => ({ tenantId: t, keyId: theirs, reason: "x" }),
      code: Code.NotFound,
      names: "key",
    },
    // UpdateKeyUnfrozen
    {
      rpc: "UpdateKeyUnfrozen",
      what: "reason of 1,025 characters",
      request: () => ({ tenantId: t, keyId: key, reason: "r".repeat(1025) }),
      code: Code.InvalidArgument,
      names: "reason",
    },
    {
      rpc: "UpdateKeyUnfrozen",
      what: "no tenant",
      request: () => ({ keyId: key }),
      code: Code.InvalidArgument,
      names: "tenant_id",
    },
    {
      rpc: "UpdateKeyUnfrozen",
      what: "another tenant's key",
      request: () => ({ tenantId: other, keyId: key }),
      code: Code.NotFound,
      names: "key",
    },
    // ListKeyChanges
    {
      rpc: "ListKeyChanges",
      what: "tenant not a UUID",
      request: () => ({ tenantId: "x" }),
      code: Code.InvalidArgument,
      names: "tenant_id",
    },
    {
      rpc: "ListKeyChanges",
      what: "key not a UUID",
      request: () => ({ tenantId: t, keyId: "x" }),
      code: Code.InvalidArgument,
      names: "key_id",
    },
    {
      rpc: "ListKeyChanges",
      what: "negative page size",
      request: () => ({ tenantId: t, pageSize: -5 }),
      code: Code.InvalidArgument,
      names: "page_size",
    },
    {
      rpc: "ListKeyChanges",
      what: "FetchKeys' page token",
      request: () => ({ tenantId: t, pageToken }),
      code: Code.InvalidArgument,
      names: "page_token",
    },
    {
      rpc: "ListKeyChanges",
      what: "another tenant's key",
      request: () => ({ tenantId: t, keyId: theirs }),
      code: Code.NotFound,
      names: "key",
    },
    // FetchUsageReport
    {
      rpc: "FetchUsageReport",
      what: "no since",
      request: () => ({ tenantId: t }),
      code: Code.InvalidArgument,
      names: "since",
    },
    {
      rpc: "FetchUsageReport",
      what: "since after until",
      request: () => ({ tenantId: t, since: "2026-02-01T00:00:00Z", until: since }),
      code: Code.InvalidArgument,
      names: "since",
    },
    {
      rpc: "FetchUsageReport",
      what: "unknown bucket width",
      request: () => ({ tenantId: t, since, bucketWidth: 99 }),
      code: Code.InvalidArgument,
      names: "bucket_width",
    },
    {
      rpc: "FetchUsageReport",
      what: "unknown grouping",
      request: () => ({ tenantId: t, since, groupBy: [99] }),
      code: Code.InvalidArgument,
      names: "group_by",
    },
    {
      rpc: "FetchUsageReport",
      what: "unknown order",
      request: () => ({ tenantId: t, since, orderBy: 99 }),
      code: Code.InvalidArgument,
      names: "order_by",
    },
    {
      rpc: "FetchUsageReport",
      what: "a key not a UUID",
      request: () => ({ tenantId: t, since, keyIds: [key, "x"] }),
      code: Code.InvalidArgument,
      names: "key_ids",
    },
    {
      rpc: "FetchUsageReport",
      what: "1,001 keys",
      request: () => ({ tenantId: t, since, keyIds: Array.from({ length: 1001 }, () => randomUUID()) }),
      code: Code.InvalidArgument,
      names: "key_ids",
    },
    {
      rpc: "FetchUsageReport",
      what: "FetchKeys' page token",
      request: () => ({ tenantId: t, since, pageToken }),
      code: Code.InvalidArgument,
      names: "page_token",
    },
    {
      rpc: "FetchUsageReport",
      what: "another tenant's key",
      request: () => ({ tenantId: t, since, keyIds: [theirs] }),
      code: Code.NotFound,
      names: "key",
    },
    // WatchKeys
    {
      rpc: "WatchKeys",
      what: "no tenant, not all tenants",
      request: () => ({}),
      code: Code.InvalidArgument,
      names: "tenant_id",
      stream: true,
    },
    {
      rpc: "WatchKeys",
      what: "forged cursor",
      request: () => ({ tenantId: t, resumeCursor: "forged" }),
      code: Code.InvalidArgument,
      names: "resume_cursor",
      stream: true,
    },
    {
      rpc: "WatchKeys",
      what: "a key not a UUID",
      request: () => ({ tenantId: t, keyIds: ["x"] }),
      code: Code.InvalidArgument,
      names: "key_ids",
      stream: true,
    },
  ];

  // What a bad request must not change.
  async function written() {
    return await service.db.sql`
      select
        (select coalesce(sum(version), 0) from api_keys) as versions,
        (select count(*) from api_keys) as keys,
        (select count(*) from key_events) as events,
        (select count(*) from proxy_calls) as calls
    `;
  }

  for (const [protocol, makeCaller] of [
    ["gRPC (@grpc/grpc-js)", grpcJsCaller],
    ["Connect over HTTP/1.1 (connect-node)", connectProtocolCaller],
  ] as const) {
    describe(`over ${protocol}`, () => {
      let client: JsonCaller;
      before(() => {
        client = makeCaller(service.server.address);
      });
      after(() => client.close());

      it(`answers all ${cases.length} cases with their status, naming the field, writing nothing`, async () => {
        expect(cases.length).to.be.at.least(40);
        const before = await written();
        const wrong: string[] = [];
        for (const c of cases) {
          const call = c.stream ? client.stream(c.rpc, c.request()) : client.call(c.rpc, c.request());
          const err = await failure(call).catch((e: Error) => e);
          const got = "code" in err ? Code[err.code] : "OK";
          const message = "code" in err ? err.rawMessage : "";
          const ok = "code" in err && err.code === c.code && err.rawMessage.includes(c.names);
          recordObservation({
            suite: "bad-input",
            protocol,
            ...c,
            request: c.request(),
            expected: Code[c.code],
            got,
            message,
            ok,
          });
          if (!("code" in err)) {
            wrong.push(`${c.rpc}, ${c.what}: succeeded`);
            continue;
          }
          if (!ok) wrong.push(`${c.rpc}, ${c.what}: ${Code[err.code]} "${err.rawMessage}"`);
        }
        const after = await written();
        const health = createClient(Health, createGrpcTransport({ baseUrl: `http://${service.server.address}` }));
        const status = (await health.check({})).status;
        recordObservation({
          suite: "bad-input-after",
          protocol,
          nothingWritten: String(Object.values(after[0] ?? {})) === String(Object.values(before[0] ?? {})),
          healthy: status === HealthCheckResponse_ServingStatus.SERVING,
        });
        expect(wrong, wrong.join("\n")).to.deep.equal([]);
        expect(after).to.deep.equal(before);
        expect(status).to.equal(HealthCheckResponse_ServingStatus.SERVING);
      });
    });
  }
});

import type { JsonObject } from "@bufbuild/protobuf";
import { expect } from "chai";
import fc from "fast-check";
import { rollUpClosedDays } from "../src/jobs/rollup.js";
import type { RunningService } from "../src/service.js";
import { connectProtocolCaller, grpcJsCaller, type JsonCaller, RpcError } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { insertCalls, insertKey, insertKeysAt, newTenant } from "./support/fixtures.js";
import { startTestService } from "./support/service.js";

const tenantTables = [
  "api_keys",
  "proxy_calls",
  "proxy_call_daily",
  "proxy_call_hourly",
  "proxy_call_spans",
  "proxy_call_running",
  "proxy_call_late",
  "key_events",
];

// How often a statement reads or writes each tenant table, and how many
// tenant_id = $n predicates it has: each reference needs one of its own.
function references(statement: string): number {
  let n = 0;
  for (const table of tenantTables) {
    n += (statement.match(new RegExp(`\\b(from|join|update|into)\\s+${table}\\b`, "gi")) ?? []).length;
  }
  return n;
}

// A predicate per reference; or, where a statement reads across tenants on
// purpose (the all-tenants watch, the feed's head), a comment saying so.
function tenantPredicates(statement: string): number {
  const predicates = (statement.match(/\btenant_id\s*=\s*\$\d+/gi) ?? []).length;
  const declared = (statement.match(/\/\* spans tenants: [^*]+\*\//g) ?? []).length;
  return predicates + declared;
}

describe("every statement on the request path is scoped to one tenant", () => {
  let db: TestDatabase;
  let server: RunningService;
  let client: JsonCaller;
  const statements: string[] = [];

  before(async () => {
    db = await createTestDatabase();
    server = await startTestService(db.url, {}, { onQuery: (q) => statements.push(q) });
    client = grpcJsCaller(server.address);
  });
  after(async () => {
    client?.close();
    await server?.close(1000);
    await db?.drop();
  });

  it("filters by tenant_id in every statement of every rpc", async () => {
    const tenantId = newTenant();
    await insertKeysAt(db.sql, tenantId, "2026-01-01 00:00:00+00", 3);
    const [key]: [{ id: string }?] = await db.sql`select id from api_keys where tenant_id = ${tenantId} limit 1`;
    const keyId = key?.id ?? "";
    await insertCalls(db.sql, tenantId, keyId, [{ costCents: "1.5", at: "2026-01-02 00:00:00+00" }]);

    const first = await client.call("FetchKeys", { tenantId, pageSize: 1 });
    await client.call("FetchKeys", { tenantId, pageSize: 1, pageToken: first.nextPageToken as string, skip: 1 });
    await client.call("CountKeys", { tenantId });
    await client.call("FetchKeyById", { tenantId, keyId });
    await client.call("FetchKeyForUpdate", { tenantId, keyId });
    await client.call("FetchKeyUsage", { tenantId, keyId, since: "2026-01-01T00:00:00Z" });
    await client.call("FetchKeyUsage", {
      tenantId,
      keyId,
      since: "2026-01-01T00:00:00Z",
      until: "2026-02-01T00:00:00Z",
    });
    // Reports read every source: calls at the window's edges, hourly, daily and span rollups.
    await rollUpClosedDays(db.sql);
    for (const groupBy of [[], ["USAGE_GROUPING_KEY", "USAGE_GROUPING_MODEL"]]) {
      for (const bucketWidth of [
        "USAGE_BUCKET_WIDTH_UNSPECIFIED",
        "USAGE_BUCKET_WIDTH_HOUR",
        "USAGE_BUCKET_WIDTH_DAY",
      ]) {
        await client.call("FetchUsageReport", { tenantId, since: "2025-12-30T10:30:00Z", bucketWidth, groupBy });
        await client.call("FetchUsageReport", {
          tenantId,
          keyIds: [keyId],
          since: "2025-12-30T10:30:00Z",
          until: "2026-01-20T10:30:00Z",
          bucketWidth,
          groupBy,
          pageSize: 1,
        });
      }
    }
    await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "r", actor: "a" });
    await client.call("UpdateKeyUnfrozen", { tenantId, keyId });
    await client.call("UpdateKeyFrozen", { tenantId, keyId, etag: "1.0000000" }).catch(() => undefined);
    await client.call("FetchKeyById", { tenantId: newTenant(), keyId }).catch(() => undefined);
    const changes = await client.call("ListKeyChanges", { tenantId, keyId, pageSize: 1 });
    await client.call("ListKeyChanges", { tenantId, pageSize: 1 });
    await client.call("ListKeyChanges", { tenantId, keyId, pageToken: changes.nextPageToken as string });
    const watch = client.open("WatchKeys", { tenantId, sendInitialState: true });
    await watch.next();
    watch.cancel();
    const resumed = client.open("WatchKeys", {
      tenantId,
      keyIds: [keyId],
      resumeCursor: first.changes ? ((first.changes as JsonObject[])[0]?.cursor as string) : "",
    });
    await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "again" });
    await resumed.next();
    resumed.cancel();

    const onTenantTables = statements.filter((s) => references(s) > 0);
    expect(onTenantTables.length, "statements seen").to.be.at.least(9);
    for (const statement of onTenantTables) {
      expect(tenantPredicates(statement), statement).to.be.at.least(references(statement));
    }
  });
});

describe("a request naming one tenant never reaches another tenant's key, whatever the ids", function () {
  this.timeout(10 * 60_000);
  const runs = Math.max(50, Math.floor(Number(process.env.FUZZ_RUNS ?? 1000) / 4));
  let db: TestDatabase;
  let server: RunningService;
  const callers: JsonCaller[] = [];
  const tenants = [newTenant(), newTenant(), newTenant()];
  const keys: { tenantId: string; keyId: string }[] = [];
  let initial: string;

  /** Every key's state and its count of changes: what no refused request may alter. */
  const state = async () =>
    JSON.stringify(
      await db.sql`
        select k.id, k.is_frozen, k.frozen_at, k.version, k.freeze_reason,
          (select count(*) from key_events e where e.tenant_id = k.tenant_id and e.key_id = k.id) as changes
        from api_keys k
        order by k.id
      `,
      (_k, v) => (typeof v === "bigint" ? String(v) : v),
    );

  before(async () => {
    db = await createTestDatabase();
    server = await startTestService(db.url, { watchProgressIntervalMs: 100 });
    callers.push(grpcJsCaller(server.address), connectProtocolCaller(server.address));
    for (const tenantId of tenants) {
      for (let i = 0; i < 2; i++) {
        const keyId = await insertKey(db.sql, { tenantId, isFrozen: i === 1 });
        await insertCalls(db.sql, tenantId, keyId, [{ costCents: "7", at: "2026-01-02 00:00:00+00" }]);
        keys.push({ tenantId, keyId });
      }
    }
    initial = await state();
  });
  after(async () => {
    for (const c of callers) c.close();
    await server?.close(1000);
    await db?.drop();
  });

  // Every rpc that names a key, with the key of another tenant.
  const keyed: Record<string, (tenantId: string, keyId: string) => JsonObject> = {
    FetchKeyById: (tenantId, keyId) => ({ tenantId, keyId }),
    FetchKeyForUpdate: (tenantId, keyId) => ({ tenantId, keyId }),
    FetchKeyUsage: (tenantId, keyId) => ({ tenantId, keyId, since: "2026-01-01T00:00:00Z" }),
    UpdateKeyFrozen: (tenantId, keyId) => ({ tenantId, keyId, reason: "not yours" }),
    UpdateKeyUnfrozen: (tenantId, keyId) => ({ tenantId, keyId, reason: "not yours" }),
    ListKeyChanges: (tenantId, keyId) => ({ tenantId, keyId }),
    FetchUsageReport: (tenantId, keyId) => ({ tenantId, keyIds: [keyId], since: "2026-01-01T00:00:00Z" }),
  };

  it("answers NOT_FOUND on every rpc and protocol, and changes nothing", async () => {
    const wrong: string[] = [];
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...tenants),
        fc.constantFrom(...keys),
        fc.constantFrom(...Object.keys(keyed), "WatchKeys"),
        fc.constantFrom(...callers),
        fc.boolean(),
        async (tenantId, key, rpc, caller, upper) => {
          if (key.tenantId === tenantId) return;
          // The id as given, or in capitals: the same key to a UUID parser.
          const keyId = upper ? key.keyId.toUpperCase() : key.keyId;
          try {
            if (rpc === "WatchKeys") {
              const stream = caller.open("WatchKeys", { tenantId, keyIds: [keyId], sendInitialState: true });
              try {
                // A key of another tenant is no key of this one: nothing of it comes, only the markers.
                const first = await stream.next();
                if (first?.current || first?.change) wrong.push(`WatchKeys sent ${JSON.stringify(first)}`);
              } finally {
                stream.cancel();
              }
              return;
            }
            const answer = await caller.call(rpc, keyed[rpc]?.(tenantId, keyId) ?? {});
            wrong.push(`${rpc} over ${caller.name} answered ${JSON.stringify(answer).slice(0, 200)}`);
          } catch (err) {
            if (!(err instanceof RpcError) || err.code !== 5) wrong.push(`${rpc} over ${caller.name}: ${err}`);
          }
        },
      ),
      { numRuns: runs, seed: Number(process.env.FUZZ_SEED ?? Date.now() % 1_000_000) },
    );
    expect(wrong.slice(0, 5)).to.deep.equal([]);
    expect(await state()).to.equal(initial);
    // And the lists and counts name only the tenant's own keys.
    for (const tenantId of tenants) {
      const own = keys.filter((k) => k.tenantId === tenantId).map((k) => k.keyId);
      const reader = callers[0] as JsonCaller;
      const listed = await reader.call("FetchKeys", { tenantId });
      expect((listed.keys as JsonObject[]).map((k) => k.id)).to.have.members(own);
      expect((await reader.call("CountKeys", { tenantId })).count).to.equal(String(own.length));
    }
  });
});

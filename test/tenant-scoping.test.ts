import type { JsonObject } from "@bufbuild/protobuf";
import { expect } from "chai";
import { rollUpClosedDays } from "../src/jobs/rollup.js";
import type { RunningService } from "../src/service.js";
import { grpcJsCaller, type JsonCaller } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { insertCalls, insertKeysAt, newTenant } from "./support/fixtures.js";
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

import { randomUUID } from "node:crypto";
import type { JsonObject } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { expect } from "chai";
import { formatEtag } from "../src/rpc/etag.js";
import { connectGrpcCaller, failure, grpcJsCaller, type JsonCaller, type RpcError } from "./support/clients.js";
import { insertCalls, insertKey, insertKeysAt, newTenant } from "./support/fixtures.js";
import { useTestService } from "./support/service.js";

const svc = "keysdriver.v1.KeysDriverService";
const etagPattern = /^\d+\.[0-9a-z]{7}$/;

async function expectStatus(promise: Promise<unknown>, code: Code, messagePart: string): Promise<void> {
  const err = await failure(promise);
  expect(err.code, err.rawMessage).to.equal(code);
  expect(err.rawMessage).to.contain(messagePart);
}

function withoutEtag(key: unknown): JsonObject {
  const { etag, ...rest } = key as JsonObject;
  expect(etag).to.match(etagPattern);
  return rest;
}

describe(`${svc} over the gRPC protocol`, () => {
  const service = useTestService();

  for (const makeCaller of [connectGrpcCaller, grpcJsCaller]) {
    describe(`called through ${makeCaller === grpcJsCaller ? "@grpc/grpc-js" : "connect-node"}`, () => {
      let client: JsonCaller;
      before(() => {
        client = makeCaller(service.server.address);
      });
      after(() => client.close());

      describe("FetchKeyById", () => {
        it("returns every field of the key exactly, int64 beyond 2^53 included", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, {
            tenantId,
            name: "billing",
            keyPrefix: "sk_live_ab12",
            status: "revoked",
            isFrozen: true,
            frozenAt: "2026-02-03 04:05:06.000007+00",
            createdAt: "2026-01-02 03:04:05.123456+00",
            lastUsedAt: "2026-03-04 05:06:07.5+00",
            expiresAt: "2027-01-01 00:00:00+00",
            totalRequests: 9_007_199_254_740_993n,
          });
          const res = await client.call("FetchKeyById", { tenantId, keyId });
          expect(withoutEtag(res.key)).to.deep.equal({
            id: keyId,
            tenantId,
            name: "billing",
            keyPrefix: "sk_live_ab12",
            status: "KEY_STATUS_REVOKED",
            isFrozen: true,
            frozenAt: "2026-02-03T04:05:06.000007Z",
            createdAt: "2026-01-02T03:04:05.123456Z",
            lastUsedAt: "2026-03-04T05:06:07.500Z",
            expiresAt: "2027-01-01T00:00:00Z",
            totalRequests: "9007199254740993",
          });
        });

        it("leaves unset the timestamps a key does not have", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId, createdAt: "2026-01-02 00:00:00+00" });
          const res = await client.call("FetchKeyById", { tenantId, keyId });
          expect(withoutEtag(res.key)).to.deep.equal({
            id: keyId,
            tenantId,
            keyPrefix: "sk_test_0000",
            status: "KEY_STATUS_ACTIVE",
            createdAt: "2026-01-02T00:00:00Z",
          });
        });

        it("keeps instants before 1970 exact to the microsecond", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, {
            tenantId,
            createdAt: "1969-12-31 23:59:59.999999+00",
            expiresAt: "1901-02-03 04:05:06.000001+00",
          });
          const res = await client.call("FetchKeyById", { tenantId, keyId });
          expect(res.key).to.include({
            createdAt: "1969-12-31T23:59:59.999999Z",
            expiresAt: "1901-02-03T04:05:06.000001Z",
          });
          await insertCalls(service.db.sql, tenantId, keyId, [{ costCents: "2", at: "1969-12-31 23:59:59.999999+00" }]);
          const usage = await client.call("FetchKeyUsage", {
            tenantId,
            keyId,
            since: "1969-12-31T23:59:59.999999Z",
            until: "1970-01-01T00:00:00Z",
          });
          expect(usage.usage).to.include({
            requestCount: "1",
            spendCentsExact: "2",
            since: "1969-12-31T23:59:59.999999Z",
          });
        });

        it("accepts an upper-case UUID and answers with the canonical one", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          const res = await client.call("FetchKeyById", {
            tenantId: tenantId.toUpperCase(),
            keyId: keyId.toUpperCase(),
          });
          expect((res.key as JsonObject).id).to.equal(keyId);
        });

        it("answers NOT_FOUND for another tenant's key, exactly as for a missing key", async () => {
          const owner = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId: owner });
          const other = await failure(client.call("FetchKeyById", { tenantId: newTenant(), keyId }));
          const missing = await failure(client.call("FetchKeyById", { tenantId: owner, keyId: randomUUID() }));
          expect(other.code).to.equal(Code.NotFound);
          expect([other.code, other.rawMessage]).to.deep.equal([missing.code, missing.rawMessage]);
        });

        it("refuses empty and malformed ids with INVALID_ARGUMENT naming the field", async () => {
          const tenantId = newTenant();
          await expectStatus(client.call("FetchKeyById", { tenantId, keyId: "" }), Code.InvalidArgument, "key_id");
          await expectStatus(client.call("FetchKeyById", { tenantId, keyId: "42" }), Code.InvalidArgument, "key_id");
          await expectStatus(
            client.call("FetchKeyById", { tenantId: "", keyId: randomUUID() }),
            Code.InvalidArgument,
            "tenant_id",
          );
          await expectStatus(
            client.call("FetchKeyById", { tenantId: "' or 1=1 --", keyId: randomUUID() }),
            Code.InvalidArgument,
            "tenant_id",
          );
        });
      });

      describe("FetchKeyForUpdate", () => {
        it("returns the key with an etag that changes when the key changes", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId, name: "a" });
          const before = (await client.call("FetchKeyForUpdate", { tenantId, keyId })).key as JsonObject;
          const again = (await client.call("FetchKeyForUpdate", { tenantId, keyId })).key as JsonObject;
          expect(again.etag).to.equal(before.etag);
          await service.db.sql`update api_keys set name = 'b' where tenant_id = ${tenantId} and id = ${keyId}`;
          const after = (await client.call("FetchKeyForUpdate", { tenantId, keyId })).key as JsonObject;
          expect(after.name).to.equal("b");
          expect(after.etag).to.match(etagPattern).and.not.equal(before.etag);
        });

        it("answers NOT_FOUND for another tenant's key and INVALID_ARGUMENT for a bad id", async () => {
          const keyId = await insertKey(service.db.sql, { tenantId: newTenant() });
          await expectStatus(
            client.call("FetchKeyForUpdate", { tenantId: newTenant(), keyId }),
            Code.NotFound,
            "not found",
          );
          await expectStatus(
            client.call("FetchKeyForUpdate", { tenantId: newTenant(), keyId: "not-a-uuid" }),
            Code.InvalidArgument,
            "key_id",
          );
        });
      });

      describe("CountKeys", () => {
        it("counts the tenant's keys in every status, and only its own", async () => {
          const tenantId = newTenant();
          await insertKey(service.db.sql, { tenantId, status: "active" });
          await insertKey(service.db.sql, { tenantId, status: "revoked" });
          await insertKey(service.db.sql, { tenantId, status: "expired", isFrozen: true });
          await insertKey(service.db.sql, { tenantId: newTenant() });
          expect(await client.call("CountKeys", { tenantId })).to.deep.equal({ count: "3" });
        });

        it("answers zero for a tenant with no keys", async () => {
          expect(await client.call("CountKeys", { tenantId: newTenant() })).to.deep.equal({});
        });

        it("refuses a malformed tenant_id", async () => {
          await expectStatus(client.call("CountKeys", { tenantId: "abc" }), Code.InvalidArgument, "tenant_id");
          await expectStatus(client.call("CountKeys", {}), Code.InvalidArgument, "tenant_id");
        });
      });

      describe("FetchKeys", () => {
        async function expectedOrder(tenantId: string): Promise<string[]> {
          const rows: { id: string }[] = await service.db.sql`
            select id from api_keys where tenant_id = ${tenantId} order by created_at desc, id desc
          `;
          return rows.map((r) => r.id);
        }

        async function walk(tenantId: string, pageSize: number): Promise<string[]> {
          const ids: string[] = [];
          let pageToken = "";
          do {
            const res = await client.call("FetchKeys", { tenantId, pageSize, pageToken });
            const keys = (res.keys ?? []) as JsonObject[];
            expect(keys.length).to.be.at.most(pageSize);
            ids.push(...keys.map((k) => k.id as string));
            pageToken = (res.nextPageToken as string | undefined) ?? "";
          } while (pageToken !== "");
          return ids;
        }

        it("lists keys newest first, with the same snapshots as FetchKeyById", async () => {
          const tenantId = newTenant();
          const older = await insertKey(service.db.sql, {
            tenantId,
            name: "older",
            createdAt: "2026-01-01 00:00:00+00",
          });
          const newer = await insertKey(service.db.sql, {
            tenantId,
            name: "newer",
            createdAt: "2026-01-02 00:00:00+00",
          });
          const res = await client.call("FetchKeys", { tenantId });
          const keys = res.keys as JsonObject[];
          expect(keys.map((k) => k.id)).to.deep.equal([newer, older]);
          expect(res.nextPageToken).to.equal(undefined);
          const single = await client.call("FetchKeyById", { tenantId, keyId: newer });
          expect(keys[0]).to.deep.equal(single.key);
        });

        it("walks every key exactly once and in order, also when keys share created_at", async () => {
          const tenantId = newTenant();
          await insertKeysAt(service.db.sql, tenantId, "2026-03-01 00:00:00+00", 23);
          await insertKeysAt(service.db.sql, tenantId, "2026-03-02 00:00:00+00", 5);
          await insertKeysAt(service.db.sql, tenantId, "2026-02-28 00:00:00+00", 9);
          const ids = await walk(tenantId, 7);
          expect(ids).to.deep.equal(await expectedOrder(tenantId));
          expect(new Set(ids).size).to.equal(37);
        });

        it("neither repeats nor skips existing keys when keys are added between pages", async () => {
          const tenantId = newTenant();
          await insertKeysAt(service.db.sql, tenantId, "2026-04-01 00:00:00+00", 12);
          await insertKeysAt(service.db.sql, tenantId, "2026-04-02 00:00:00+00", 8);
          const existing = await expectedOrder(tenantId);
          const first = await client.call("FetchKeys", { tenantId, pageSize: 6 });
          const seen = (first.keys as JsonObject[]).map((k) => k.id as string);
          // Newer keys, keys at the page boundary's instant, and older keys.
          await insertKeysAt(service.db.sql, tenantId, "2026-05-01 00:00:00+00", 4);
          await insertKeysAt(service.db.sql, tenantId, "2026-04-01 00:00:00+00", 4);
          await insertKeysAt(service.db.sql, tenantId, "2026-01-01 00:00:00+00", 4);
          let pageToken = first.nextPageToken as string;
          while (pageToken) {
            const res = await client.call("FetchKeys", { tenantId, pageSize: 6, pageToken });
            seen.push(...((res.keys ?? []) as JsonObject[]).map((k) => k.id as string));
            pageToken = (res.nextPageToken as string | undefined) ?? "";
          }
          expect(new Set(seen).size, "no key twice").to.equal(seen.length);
          for (const id of existing) expect(seen, `existing key ${id}`).to.include(id);
          const order = await expectedOrder(tenantId);
          expect(seen).to.deep.equal(order.filter((id) => seen.includes(id)));
        });

        it("pages 50 keys by default and at most 1000", async () => {
          const tenantId = newTenant();
          await insertKeysAt(service.db.sql, tenantId, "2026-01-01 00:00:00+00", 1005);
          const byDefault = await client.call("FetchKeys", { tenantId });
          expect(byDefault.keys).to.have.length(50);
          expect(byDefault.nextPageToken).to.be.a("string").and.not.equal("");
          const clamped = await client.call("FetchKeys", { tenantId, pageSize: 5000 });
          expect(clamped.keys).to.have.length(1000);
          const rest = await client.call("FetchKeys", {
            tenantId,
            pageSize: 1000,
            pageToken: clamped.nextPageToken as string,
          });
          expect(rest.keys).to.have.length(5);
          expect(rest.nextPageToken).to.equal(undefined);
        });

        it("skips keys from the start or from the token's position", async () => {
          const tenantId = newTenant();
          await insertKeysAt(service.db.sql, tenantId, "2026-01-01 00:00:00+00", 10);
          const order = await expectedOrder(tenantId);
          const skipped = await client.call("FetchKeys", { tenantId, pageSize: 3, skip: 2 });
          expect((skipped.keys as JsonObject[]).map((k) => k.id)).to.deep.equal(order.slice(2, 5));
          const next = await client.call("FetchKeys", {
            tenantId,
            pageSize: 3,
            skip: 1,
            pageToken: skipped.nextPageToken as string,
          });
          expect((next.keys as JsonObject[]).map((k) => k.id)).to.deep.equal(order.slice(6, 9));
        });

        it("never lists another tenant's keys", async () => {
          const mine = newTenant();
          const theirs = newTenant();
          const myKey = await insertKey(service.db.sql, { tenantId: mine });
          await insertKey(service.db.sql, { tenantId: theirs });
          const res = await client.call("FetchKeys", { tenantId: mine });
          expect((res.keys as JsonObject[]).map((k) => k.id)).to.deep.equal([myKey]);
          expect(await client.call("FetchKeys", { tenantId: newTenant() })).to.deep.equal({});
        });

        it("refuses a token from another tenant, an edited token and garbage", async () => {
          const tenantId = newTenant();
          await insertKeysAt(service.db.sql, tenantId, "2026-01-01 00:00:00+00", 3);
          const first = await client.call("FetchKeys", { tenantId, pageSize: 1 });
          const token = first.nextPageToken as string;
          await expectStatus(
            client.call("FetchKeys", { tenantId: newTenant(), pageToken: token }),
            Code.InvalidArgument,
            "page_token",
          );
          const position = 12;
          const edited = token.slice(0, position) + (token[position] === "A" ? "B" : "A") + token.slice(position + 1);
          await expectStatus(
            client.call("FetchKeys", { tenantId, pageToken: edited }),
            Code.InvalidArgument,
            "page_token",
          );
          await expectStatus(
            client.call("FetchKeys", { tenantId, pageToken: "garbage!" }),
            Code.InvalidArgument,
            "page_token",
          );
          await expectStatus(
            client.call("FetchKeys", { tenantId, pageToken: `${token}AA` }),
            Code.InvalidArgument,
            "page_token",
          );
        });

        it("refuses a negative page_size or skip and a bad tenant_id", async () => {
          const tenantId = newTenant();
          await expectStatus(client.call("FetchKeys", { tenantId, pageSize: -1 }), Code.InvalidArgument, "page_size");
          await expectStatus(client.call("FetchKeys", { tenantId, skip: -5 }), Code.InvalidArgument, "skip");
          await expectStatus(client.call("FetchKeys", { tenantId: "x" }), Code.InvalidArgument, "tenant_id");
        });
      });

      describe("FetchKeyUsage", () => {
        async function keyWithCalls() {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          await insertCalls(service.db.sql, tenantId, keyId, [
            { costCents: "0.0125", at: "2026-05-01 00:00:00+00" },
            { costCents: "1.5", at: "2026-05-01 00:00:00.000001+00" },
            { costCents: "2.4875", at: "2026-05-02 00:00:00+00" },
            { costCents: "7", at: "2026-06-01 00:00:00+00" },
          ]);
          return { tenantId, keyId };
        }

        it("sums calls in [since, until): since inclusive, until exclusive, fractional cents exact", async () => {
          const { tenantId, keyId } = await keyWithCalls();
          const res = await client.call("FetchKeyUsage", {
            tenantId,
            keyId,
            since: "2026-05-01T00:00:00Z",
            until: "2026-05-02T00:00:00Z",
          });
          expect(res).to.deep.equal({
            usage: {
              keyId,
              since: "2026-05-01T00:00:00Z",
              until: "2026-05-02T00:00:00Z",
              requestCount: "2",
              spendCents: "2",
              spendCentsExact: "1.5125",
            },
          });
          const shifted = await client.call("FetchKeyUsage", {
            tenantId,
            keyId,
            since: "2026-05-01T00:00:00.000001Z",
            until: "2026-05-02T00:00:00.000001Z",
          });
          expect(shifted.usage).to.include({ requestCount: "2", spendCentsExact: "3.9875", spendCents: "4" });
        });

        it("rounds the whole-cent total half-up", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          await insertCalls(service.db.sql, tenantId, keyId, [
            { costCents: "0.25", at: "2026-05-01 00:00:00+00" },
            { costCents: "0.25", at: "2026-05-01 00:00:01+00" },
            { costCents: "2", at: "2026-05-03 00:00:00+00" },
          ]);
          const half = await client.call("FetchKeyUsage", {
            tenantId,
            keyId,
            since: "2026-05-01T00:00:00Z",
            until: "2026-05-02T00:00:00Z",
          });
          expect(half.usage).to.include({ spendCentsExact: "0.5", spendCents: "1" });
          const twoAndHalf = await client.call("FetchKeyUsage", {
            tenantId,
            keyId,
            since: "2026-05-01T00:00:00Z",
            until: "2026-05-04T00:00:00Z",
          });
          expect(twoAndHalf.usage).to.include({ spendCentsExact: "2.5", spendCents: "3", requestCount: "3" });
        });

        it("keeps sums beyond 2^53 exact", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          await service.db.sql`
            insert into proxy_calls (tenant_id, api_key_id, cost_cents, created_at)
            select ${tenantId}, ${keyId}, 99999999999999.51, '2026-05-01'::timestamptz + n * interval '1 second'
            from generate_series(1, 100) as n
          `;
          const res = await client.call("FetchKeyUsage", { tenantId, keyId, since: "2026-01-01T00:00:00Z" });
          expect(res.usage).to.include({
            requestCount: "100",
            spendCentsExact: "9999999999999951",
            spendCents: "9999999999999951",
          });
        });

        it("counts up to now when until is unset, and answers zero for a key with no calls", async () => {
          const { tenantId, keyId } = await keyWithCalls();
          const all = await client.call("FetchKeyUsage", { tenantId, keyId, since: "2020-01-01T00:00:00Z" });
          expect(all.usage).to.include({ requestCount: "4", spendCentsExact: "11", spendCents: "11" });
          const until = Date.parse((all.usage as JsonObject).until as string);
          expect(Math.abs(until - Date.now())).to.be.below(60_000);

          const idle = await insertKey(service.db.sql, { tenantId });
          const none = await client.call("FetchKeyUsage", {
            tenantId,
            keyId: idle,
            since: "2026-05-01T00:00:00Z",
            until: "2026-05-01T00:00:00Z",
          });
          expect(none).to.deep.equal({
            usage: { keyId: idle, since: "2026-05-01T00:00:00Z", until: "2026-05-01T00:00:00Z", spendCentsExact: "0" },
          });
        });

        it("gives the int64 maximum for a spend beyond it, and the exact sum beside it", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          await service.db.sql`
            insert into proxy_calls (tenant_id, api_key_id, created_at, cost_cents)
            select ${tenantId}, ${keyId}, timestamptz '2026-03-02 00:00:00+00' + n * interval '1 second', 99999999999999.999999
            from generate_series(1, 100000) as n
          `;
          const res = await client.call("FetchKeyUsage", { tenantId, keyId, since: "2026-03-01T00:00:00Z" });
          expect(res.usage).to.include({
            requestCount: "100000",
            spendCents: "9223372036854775807",
            spendCentsExact: "9999999999999999999.9",
          });
        });

        it("answers NOT_FOUND for another tenant's key even though it has calls", async () => {
          const { keyId } = await keyWithCalls();
          await expectStatus(
            client.call("FetchKeyUsage", { tenantId: newTenant(), keyId, since: "2020-01-01T00:00:00Z" }),
            Code.NotFound,
            "not found",
          );
          await expectStatus(
            client.call("FetchKeyUsage", { tenantId: newTenant(), keyId: randomUUID(), since: "2020-01-01T00:00:00Z" }),
            Code.NotFound,
            "not found",
          );
        });

        it("refuses since after until, a missing since, and bad ids", async () => {
          const { tenantId, keyId } = await keyWithCalls();
          await expectStatus(
            client.call("FetchKeyUsage", {
              tenantId,
              keyId,
              since: "2026-05-02T00:00:00Z",
              until: "2026-05-01T00:00:00Z",
            }),
            Code.InvalidArgument,
            "since",
          );
          await expectStatus(client.call("FetchKeyUsage", { tenantId, keyId }), Code.InvalidArgument, "since");
          // No until: the window ends at the database's clock, before this since.
          await expectStatus(
            client.call("FetchKeyUsage", { tenantId, keyId, since: "9999-01-01T00:00:00Z" }),
            Code.InvalidArgument,
            "since",
          );
          await expectStatus(
            client.call("FetchKeyUsage", { tenantId, keyId: "", since: "2026-05-02T00:00:00Z" }),
            Code.InvalidArgument,
            "key_id",
          );
          await expectStatus(
            client.call("FetchKeyUsage", { tenantId: "nope", keyId, since: "2026-05-02T00:00:00Z" }),
            Code.InvalidArgument,
            "tenant_id",
          );
        });
      });

      describe("UpdateKeyFrozen and UpdateKeyUnfrozen", () => {
        async function stored(tenantId: string, keyId: string) {
          const [row]: [Record<string, unknown>?] = await service.db.sql`
            select is_frozen, frozen_at, freeze_reason, freeze_actor, unfreeze_reason, unfreeze_actor, version
            from api_keys where tenant_id = ${tenantId} and id = ${keyId}
          `;
          return row;
        }

        it("freezes with the database's clock and stores reason and actor", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          const res = await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "leaked", actor: "alice" });
          expect(res.changed).to.equal(true);
          const key = res.key as JsonObject;
          expect(key.isFrozen).to.equal(true);
          expect(Math.abs(Date.parse(key.frozenAt as string) - Date.now())).to.be.below(60_000);
          expect(await stored(tenantId, keyId)).to.include({
            is_frozen: true,
            freeze_reason: "leaked",
            freeze_actor: "alice",
          });
        });

        it("keeps the caller's frozen_at to the microsecond", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId, createdAt: "2025-06-01 00:00:00+00" });
          const res = await client.call("UpdateKeyFrozen", {
            tenantId,
            keyId,
            frozenAt: "2026-07-08T09:10:11.123456789Z",
          });
          expect((res.key as JsonObject).frozenAt).to.equal("2026-07-08T09:10:11.123456Z");
        });

        it("a frozen key stays frozen, with its first frozen_at, when the freeze is retried", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId, createdAt: "2025-06-01 00:00:00+00" });
          const first = await client.call("UpdateKeyFrozen", {
            tenantId,
            keyId,
            frozenAt: "2026-01-01T00:00:00Z",
            reason: "first",
          });
          const retry = await client.call("UpdateKeyFrozen", {
            tenantId,
            keyId,
            frozenAt: "2026-02-02T00:00:00Z",
            reason: "second",
          });
          expect(retry.changed).to.equal(undefined);
          expect(retry.key).to.deep.equal(first.key);
          expect((retry.key as JsonObject).frozenAt).to.equal("2026-01-01T00:00:00Z");
          expect(await stored(tenantId, keyId)).to.include({ freeze_reason: "first" });
        });

        it("unfreezes, clearing frozen_at, and is idempotent too", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId, isFrozen: true });
          const res = await client.call("UpdateKeyUnfrozen", { tenantId, keyId, reason: "rotated", actor: "bob" });
          expect(res.changed).to.equal(true);
          expect(res.key).to.not.have.property("isFrozen");
          expect(res.key).to.not.have.property("frozenAt");
          expect(await stored(tenantId, keyId)).to.include({
            is_frozen: false,
            frozen_at: null,
            unfreeze_reason: "rotated",
            unfreeze_actor: "bob",
          });
          const retry = await client.call("UpdateKeyUnfrozen", { tenantId, keyId });
          expect(retry.changed).to.equal(undefined);
          expect(retry.key).to.deep.equal(res.key);
        });

        it("applies an update with a current etag and refuses a stale one with ABORTED, writing nothing", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          const { key } = await client.call("FetchKeyForUpdate", { tenantId, keyId });
          const etag = (key as JsonObject).etag as string;
          const frozen = await client.call("UpdateKeyFrozen", { tenantId, keyId, etag });
          expect(frozen.changed).to.equal(true);
          const before = await stored(tenantId, keyId);
          await expectStatus(client.call("UpdateKeyUnfrozen", { tenantId, keyId, etag }), Code.Aborted, "etag");
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId, etag, reason: "x" }),
            Code.Aborted,
            "etag",
          );
          expect(await stored(tenantId, keyId)).to.deep.equal(before);
          const current = (frozen.key as JsonObject).etag as string;
          const unfrozen = await client.call("UpdateKeyUnfrozen", { tenantId, keyId, etag: current });
          expect(unfrozen.changed).to.equal(true);
        });

        it("refuses an etag of another key and a malformed etag", async () => {
          const tenantId = newTenant();
          const a = await insertKey(service.db.sql, { tenantId });
          const b = await insertKey(service.db.sql, { tenantId });
          const { key } = await client.call("FetchKeyForUpdate", { tenantId, keyId: a });
          const etagOfA = (key as JsonObject).etag as string;
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId: b, etag: etagOfA }),
            Code.InvalidArgument,
            "etag",
          );
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId: b, etag: "1" }),
            Code.InvalidArgument,
            "etag",
          );
          // Well formed for the key, but naming a version past int8.
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId: b, etag: formatEtag(b, 9_999_999_999_999_999_999n) }),
            Code.InvalidArgument,
            "etag",
          );
          expect(await stored(tenantId, b)).to.include({ is_frozen: false });
        });

        it("answers NOT_FOUND for another tenant's key and leaves it untouched", async () => {
          const owner = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId: owner });
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId: newTenant(), keyId }),
            Code.NotFound,
            "not found",
          );
          expect(await stored(owner, keyId)).to.include({ is_frozen: false, version: 1n });
          await service.db
            .sql`update api_keys set is_frozen = true, frozen_at = now() where tenant_id = ${owner} and id = ${keyId}`;
          await expectStatus(
            client.call("UpdateKeyUnfrozen", { tenantId: newTenant(), keyId }),
            Code.NotFound,
            "not found",
          );
          expect(await stored(owner, keyId)).to.include({ is_frozen: true });
        });

        it("refuses bad ids, an oversized reason or actor, and an invalid frozen_at", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          const inAnHour = new Date(Date.now() + 3_600_000).toISOString();
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId, frozenAt: inAnHour }),
            Code.InvalidArgument,
            "frozen_at",
          );
          await expectStatus(client.call("UpdateKeyFrozen", { tenantId, keyId: "" }), Code.InvalidArgument, "key_id");
          await expectStatus(
            client.call("UpdateKeyUnfrozen", { tenantId: "", keyId }),
            Code.InvalidArgument,
            "tenant_id",
          );
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "r".repeat(1025) }),
            Code.InvalidArgument,
            "reason",
          );
          await expectStatus(
            client.call("UpdateKeyUnfrozen", { tenantId, keyId, actor: "a".repeat(257) }),
            Code.InvalidArgument,
            "actor",
          );
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "nul\u0000byte" }),
            Code.InvalidArgument,
            "reason",
          );
          expect(await stored(tenantId, keyId)).to.include({ is_frozen: false, version: 1n });
        });

        it("counts a reason's limit in characters, not UTF-16 units", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          // U+1F511 (key) is two UTF-16 units: 1,024 of them are 2,048 units.
          await expectStatus(
            client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "\u{1F511}".repeat(1025) }),
            Code.InvalidArgument,
            "reason",
          );
          expect(await stored(tenantId, keyId)).to.include({ is_frozen: false, version: 1n });
          await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "\u{1F511}".repeat(1024) });
          expect(await stored(tenantId, keyId)).to.include({ freeze_reason: "\u{1F511}".repeat(1024) });
        });

        it("200 concurrent freezes and unfreezes leave the key consistent, every change counted once", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          const results = await Promise.all(
            Array.from({ length: 200 }, (_, i) =>
              client.call(i % 2 === 0 ? "UpdateKeyFrozen" : "UpdateKeyUnfrozen", {
                tenantId,
                keyId,
                actor: `caller-${i}`,
              }),
            ),
          );
          const changes = results.filter((r) => r.changed === true).length;
          const row = await stored(tenantId, keyId);
          expect(row?.is_frozen).to.equal(row?.frozen_at !== null);
          expect(row?.version).to.equal(1n + BigInt(changes));
          const now = await client.call("FetchKeyById", { tenantId, keyId });
          expect((now.key as JsonObject).isFrozen ?? false).to.equal(row?.is_frozen);
        });

        it("of many updates racing with the same etag, exactly one wins", async () => {
          const tenantId = newTenant();
          const keyId = await insertKey(service.db.sql, { tenantId });
          const { key } = await client.call("FetchKeyForUpdate", { tenantId, keyId });
          const etag = (key as JsonObject).etag as string;
          const outcomes = await Promise.allSettled(
            Array.from({ length: 20 }, (_, i) =>
              client.call(i % 2 === 0 ? "UpdateKeyFrozen" : "UpdateKeyUnfrozen", { tenantId, keyId, etag }),
            ),
          );
          const aborted = outcomes.filter(
            (o) => o.status === "rejected" && (o.reason as RpcError).code === Code.Aborted,
          );
          const fulfilled = outcomes.filter((o) => o.status === "fulfilled");
          expect(aborted.length + fulfilled.length).to.equal(20);
          // Only the freezes can win (the key starts unfrozen, so an unfreeze
          // with the etag is a no-op that leaves the version as it was); the
          // first freeze moves the version and every later call is stale.
          const changed = fulfilled.filter((o) => (o as PromiseFulfilledResult<JsonObject>).value.changed === true);
          expect(changed).to.have.length(1);
        });
      });
    });
  }
});

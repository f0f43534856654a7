import { randomUUID } from "node:crypto";
import { createRequire } from "node:module";
import type { JsonObject } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { expect } from "chai";
import type Postgres from "postgres";
import { checkedResults, createSql, ResultMismatchError, type Sql } from "../src/db/client.js";
import type { RunningService } from "../src/service.js";
import { grpcJsCaller, type JsonCaller, type RpcError } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { insertCalls, insertKey, newTenant } from "./support/fixtures.js";
import { startTestService } from "./support/service.js";

// postgres.js 3.4.x, after a statement fails part-way through its rows,
// resolves the next statement on the same connection with a sparse array
// (porsager/postgres#1181). The service loads it with a fix
// (src/db/postgres-fixes.js) and checks every result's length against
// the server's row count (src/db/client.ts).

/** Streams two rows, then fails on the third (division by zero). */
async function failPartWay(sql: Sql): Promise<void> {
  const error = await sql`
    select n, 1 / (3 - n) as boom
    from generate_series(1, 5) as n
  `.catch((err: unknown) => err);
  expect(String(error)).to.contain("division by zero");
}

describe("a statement that fails part-way through its rows", () => {
  let db: TestDatabase;
  before(async () => {
    db = await createTestDatabase();
  });
  after(async () => {
    await db?.drop();
  });

  describe("through the whole service, on its only connection", () => {
    let service: RunningService;
    let client: JsonCaller;
    before(async () => {
      service = await startTestService(db.url, { poolMax: 1 });
      client = grpcJsCaller(service.address);
    });
    after(async () => {
      client?.close();
      await service?.close(1000);
    });

    it("leaves every rpc answering exactly on that connection afterwards", async () => {
      const tenantId = newTenant();
      const other = newTenant();
      const keyId = await insertKey(db.sql, { tenantId, name: "a", createdAt: "2026-01-02 00:00:00+00" });
      const second = await insertKey(db.sql, { tenantId, name: "b", createdAt: "2026-01-01 00:00:00+00" });
      const foreign = await insertKey(db.sql, { tenantId: other, name: "theirs" });
      await insertCalls(db.sql, tenantId, keyId, [{ costCents: "1.25", at: "2026-01-03 00:00:00+00" }]);

      const check = async () => {
        const page = await client.call("FetchKeys", { tenantId });
        expect((page.keys as JsonObject[]).map((k) => k.id)).to.deep.equal([keyId, second]);
        expect(await client.call("CountKeys", { tenantId })).to.deep.equal({ count: "2" });
        expect(
          ((await client.call("FetchKeyById", { tenantId: other, keyId: foreign })).key as JsonObject).name,
        ).to.equal("theirs");
        const usage = await client.call("FetchKeyUsage", { tenantId, keyId, since: "2026-01-01T00:00:00Z" });
        expect(usage.usage).to.include({ requestCount: "1", spendCentsExact: "1.25" });
        const forUpdate = await client.call("FetchKeyForUpdate", { tenantId, keyId });
        const etag = (forUpdate.key as JsonObject).etag as string;
        expect((await client.call("UpdateKeyFrozen", { tenantId, keyId, etag })).changed).to.equal(true);
        expect((await client.call("UpdateKeyUnfrozen", { tenantId, keyId })).changed).to.equal(true);
        const missing = await client.call("FetchKeyById", { tenantId, keyId: randomUUID() }).catch((e: unknown) => e);
        expect((missing as RpcError).code).to.equal(Code.NotFound);
      };
      for (let round = 0; round < 3; round++) {
        await failPartWay(service.sql);
        await check();
      }
    });
  });

  it("resolves the next statement on the connection with exactly its rows", async () => {
    const sql = createSql({ url: db.url, poolMax: 1, statementTimeoutMs: 0 });
    try {
      await failPartWay(sql);
      const rows = await sql`select n from generate_series(1, 4) as n`;
      expect(rows.map((r) => r.n)).to.deep.equal([1, 2, 3, 4]);
      expect(rows).to.have.length(4);
    } finally {
      await sql.end();
    }
  });

  it("is caught by the result check where the driver is not fixed, instead of answering wrongly", async () => {
    // The CommonJS build of postgres.js is not touched by the fix: it shows
    // the bug, and that the check turns it into an error.
    const require = createRequire(import.meta.url);
    const unfixed = require("postgres") as typeof Postgres;
    const sql = checkedResults(unfixed(db.url, { max: 1, onnotice: () => {} }) as unknown as Sql);
    try {
      await failPartWay(sql);
      const error = await sql`select n from generate_series(1, 4) as n`.catch((err: unknown) => err);
      expect(error).to.be.instanceOf(ResultMismatchError);
      // The connection is usable again once a statement completes.
      expect([...(await sql`select 1 as one`)]).to.deep.equal([{ one: 1 }]);
    } finally {
      await sql.end();
    }
  });
});

describe("postgres.js with fetch_types off (porsager/postgres#1219)", () => {
  it("reserves a connection on a pool that has none open yet", async () => {
    const db = await createTestDatabase();
    const sql = createSql({ url: db.url, poolMax: 2, statementTimeoutMs: 0 });
    try {
      const reserved = await sql.reserve();
      try {
        const [row]: [{ n: bigint }?] = await reserved`select 1::int8 as n`;
        expect(row?.n).to.equal(1n);
      } finally {
        reserved.release();
      }
    } finally {
      await sql.end({ timeout: 1 });
      await db.drop();
    }
  });
});

describe("postgres.js when a reserved connection's server goes away (porsager/postgres#1208)", () => {
  it("fails its statements and its rollback, then the pool serves on", async () => {
    const db = await createTestDatabase();
    const sql = createSql({ url: db.url, poolMax: 2, statementTimeoutMs: 5000 });
    try {
      const reserved = await sql.reserve();
      await reserved`begin`;
      const [row]: [{ pid: number }?] = await reserved`select pg_backend_pid() as pid`;
      await db.sql`select pg_terminate_backend(${row?.pid ?? 0})`;
      // Before the fix: a TypeError thrown from a timer, ending the process,
      // or a rollback that never settles.
      const code = (err: unknown) => (err as { code?: string }).code;
      for (let i = 0; i < 20 && code(await reserved`select 1`.catch((e: unknown) => e)) !== "CONNECTION_CLOSED"; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      expect(code(await reserved`select 1`.catch((e: unknown) => e))).to.equal("CONNECTION_CLOSED");
      expect(code(await reserved`rollback`.catch((e: unknown) => e))).to.equal("CONNECTION_CLOSED");
      reserved.release();
      for (let i = 0; i < 4; i++) {
        const [one]: [{ n: bigint }?] = await sql`select 1::int8 as n`;
        expect(one?.n).to.equal(1n);
      }
    } finally {
      await sql.end({ timeout: 1 });
      await db.drop();
    }
  });
});

import { Code } from "@connectrpc/connect";
import { expect } from "chai";
import type { Sql } from "../src/db/client.js";
import type { RunningService } from "../src/service.js";
import {
  connectGrpcCaller,
  connectHttp2Caller,
  connectProtocolCaller,
  failure,
  grpcJsCaller,
  type JsonCaller,
} from "./support/clients.js";
import type { TestDatabase } from "./support/database.js";
import { insertKey, newTenant } from "./support/fixtures.js";
import type { FreezableProxy } from "./support/proxy.js";
import { useServiceBehindFreezableProxy } from "./support/service.js";

/** The service's statements still running on the server (not the listener's, not the probe's). */
async function runningStatements(sql: Sql): Promise<string[]> {
  const rows = await sql<{ query: string }[]>`
    select query from pg_stat_activity
    where application_name = 'keys-driver-service' and state = 'active' and query not ilike '%listen%'
      and pid <> pg_backend_pid()
  `;
  return rows.map((r) => r.query);
}

async function eventually(check: () => Promise<boolean>, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 25));
  }
  return check();
}

async function callsCounted(service: RunningService, method: string, code: string): Promise<number> {
  return (await service.metrics.calls())[`${method} ${code}`] ?? 0;
}

describe("a caller's deadline and cancel reach the database", () => {
  const under = useServiceBehindFreezableProxy();
  let db: TestDatabase;
  let proxy: FreezableProxy;
  let service: RunningService;
  before(() => {
    ({ db, proxy, service } = under);
  });

  for (const makeCaller of [grpcJsCaller, connectGrpcCaller, connectProtocolCaller, connectHttp2Caller]) {
    it(`ends a freeze waiting on a locked row at its deadline, cancels its statement, writes nothing (${makeCaller.name})`, async () => {
      const client: JsonCaller = makeCaller(service.address);
      const tenantId = newTenant();
      const keyId = await insertKey(db.sql, { tenantId });
      const okBefore = await callsCounted(service, "UpdateKeyFrozen", "OK");
      const lateBefore = await callsCounted(service, "UpdateKeyFrozen", "DEADLINE_EXCEEDED");
      const holder = await db.sql.reserve();
      try {
        await holder`begin`;
        await holder`select 1 from api_keys where tenant_id = ${tenantId} and id = ${keyId} for update`;
        const started = performance.now();
        const err = await failure(client.call("UpdateKeyFrozen", { tenantId, keyId }, { timeoutMs: 300 }));
        const elapsed = performance.now() - started;
        expect(err.code).to.equal(Code.DeadlineExceeded);
        expect(elapsed).to.be.within(290, 450);
        // The statement left the server; its connection serves the next call.
        expect(await eventually(async () => (await runningStatements(db.sql)).length === 0, 1000)).to.equal(true);
      } finally {
        await holder`rollback`;
        holder.release();
      }
      const key = await client.call("FetchKeyById", { tenantId, keyId });
      expect((key.key as { isFrozen?: boolean }).isFrozen ?? false).to.equal(false);
      // The server counts the call as it ends, which can be just after the client gave up.
      const counted = async () =>
        (await callsCounted(service, "UpdateKeyFrozen", "DEADLINE_EXCEEDED")) === lateBefore + 1;
      expect(await eventually(counted, 1000)).to.equal(true);
      expect(await callsCounted(service, "UpdateKeyFrozen", "OK")).to.equal(okBefore);
      client.close();
    });
  }

  it("ends a call the client cancels, and cancels its statement", async () => {
    const client = grpcJsCaller(service.address);
    const tenantId = newTenant();
    const keyId = await insertKey(db.sql, { tenantId });
    const holder = await db.sql.reserve();
    try {
      await holder`begin`;
      await holder`select 1 from api_keys where tenant_id = ${tenantId} and id = ${keyId} for update`;
      const abort = new AbortController();
      setTimeout(() => abort.abort(), 150);
      const err = await failure(client.call("UpdateKeyFrozen", { tenantId, keyId }, { signal: abort.signal }));
      expect(err.code).to.equal(Code.Canceled);
      expect(await eventually(async () => (await runningStatements(db.sql)).length === 0, 1000)).to.equal(true);
      expect(
        await eventually(async () => (await callsCounted(service, "UpdateKeyFrozen", "CANCELLED")) === 1, 1000),
      ).to.equal(true);
    } finally {
      await holder`rollback`;
      holder.release();
    }
    client.close();
  });

  it("counts a WatchKeys stream the client cancels as CANCELLED on every protocol, never INTERNAL or OK", async () => {
    const tenantId = newTenant();
    const before = await service.metrics.calls();
    for (const makeCaller of [grpcJsCaller, connectGrpcCaller, connectProtocolCaller, connectHttp2Caller]) {
      const client = makeCaller(service.address);
      for (let i = 0; i < 5; i++) {
        const stream = client.open("WatchKeys", { tenantId });
        await stream.next();
        stream.cancel();
      }
      client.close();
    }
    const counted = async (code: string) =>
      ((await service.metrics.calls())[`WatchKeys ${code}`] ?? 0) - (before[`WatchKeys ${code}`] ?? 0);
    expect(await eventually(async () => (await counted("CANCELLED")) === 20, 3000)).to.equal(true);
    expect(await counted("OK")).to.equal(0);
    expect(await counted("INTERNAL")).to.equal(0);
  });

  it("takes a deadline longer than a timer can hold (Connect's 10 digits) as far away, not as passed", async () => {
    const tenantId = newTenant();
    const res = await fetch(`http://${service.address}/keysdriver.v1.KeysDriverService/CountKeys`, {
      method: "POST",
      headers: { "content-type": "application/json", "connect-timeout-ms": "9999999999" },
      body: JSON.stringify({ tenantId }),
    });
    expect(res.status).to.equal(200);
  });

  it("ends calls at their deadline while the database does not answer, and serves again when it does", async function () {
    this.timeout(20_000);
    const client = grpcJsCaller(service.address);
    const tenantId = newTenant();
    const keyId = await insertKey(db.sql, { tenantId });
    await client.call("FetchKeyById", { tenantId, keyId });
    const okBefore = await callsCounted(service, "FetchKeyById", "OK");
    proxy.pause(); // as a stopped PostgreSQL (SIGSTOP): connections open, nothing answered
    try {
      const calls = Array.from({ length: 15 }, async (_, i) => {
        const started = performance.now();
        const method = i % 3 === 0 ? "UpdateKeyFrozen" : "FetchKeyById";
        const err = await failure(client.call(method, { tenantId, keyId }, { timeoutMs: 300 }));
        return { code: err.code, elapsed: performance.now() - started };
      });
      for (const { code, elapsed } of await Promise.all(calls)) {
        expect(code).to.equal(Code.DeadlineExceeded);
        expect(elapsed).to.be.within(290, 450);
      }
      expect(await callsCounted(service, "FetchKeyById", "OK")).to.equal(okBefore);
    } finally {
      proxy.resume();
    }
    const key = await client.call("FetchKeyById", { tenantId, keyId }, { timeoutMs: 5000 });
    expect((key.key as { id: string }).id).to.equal(keyId);
    client.close();
  });
});

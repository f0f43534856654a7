import { expect } from "chai";
import { pruneKeyEvents } from "../src/jobs/prune-key-events.js";
import { rollUpClosedDays } from "../src/jobs/rollup.js";
import { grpcJsCaller } from "./support/clients.js";
import { insertCalls, insertKey, newTenant } from "./support/fixtures.js";
import { useTestService } from "./support/service.js";

// The service acts as keys_driver_service (migration 0007), which may do
// what the rpcs and jobs need and nothing else: PostgreSQL, not only the
// code, keeps the key hashes in the database and the schema unchanged.

/** The SQLSTATE a statement fails with, or "ok". */
async function outcome(statement: Promise<unknown>): Promise<string> {
  try {
    await statement;
    return "ok";
  } catch (err) {
    return (err as { code?: string }).code ?? String(err);
  }
}

describe("the database role the service acts as", () => {
  const service = useTestService();

  it("runs every statement as keys_driver_service, and records it with each change", async () => {
    const [me] = await service.server.sql`select current_user as role`;
    expect(me?.role).to.equal("keys_driver_service");
    const tenantId = newTenant();
    const keyId = await insertKey(service.db.sql, { tenantId });
    const caller = grpcJsCaller(service.server.address);
    try {
      await caller.call("UpdateKeyFrozen", { tenantId, keyId, reason: "leaked" });
      const { changes } = await caller.call("ListKeyChanges", { tenantId, keyId });
      expect((changes as { dbRole: string }[])[0]?.dbRole).to.equal("keys_driver_service");
    } finally {
      caller.close();
    }
  });

  it("may run the background jobs: the usage rollup and the pruning of old changes", async () => {
    const tenantId = newTenant();
    const keyId = await insertKey(service.db.sql, { tenantId });
    const at = "2026-01-02 03:00:00+00";
    await insertCalls(
      service.db.sql,
      tenantId,
      keyId,
      [1, 2, 3].map((cents) => ({ costCents: String(cents), at })),
    );
    const run = await rollUpClosedDays(service.server.sql);
    expect(run.ran).to.equal(true);
    expect(run.days.length).to.be.greaterThan(0);
    const [rolled] = await service.db.sql`
      select sum(request_count)::int8 as requests from proxy_call_daily where tenant_id = ${tenantId}
    `;
    expect(rolled?.requests).to.equal(3n);
    await pruneKeyEvents(service.server.sql, 1);
  });

  it("may not read key_hash, by any statement", async () => {
    const sql = service.server.sql;
    const tenantId = newTenant();
    const keyId = await insertKey(service.db.sql, { tenantId });
    expect(await outcome(sql`select key_hash from api_keys where tenant_id = ${tenantId}`)).to.equal("42501");
    expect(await outcome(sql`select * from api_keys where tenant_id = ${tenantId}`)).to.equal("42501");
    expect(await outcome(sql`select k from api_keys as k where tenant_id = ${tenantId}`)).to.equal("42501");
    expect(
      await outcome(sql`update api_keys set is_frozen = is_frozen where id = ${keyId} returning key_hash`),
    ).to.equal("42501");
    expect(await outcome(sql`select count(*) from api_keys where key_hash is not null`)).to.equal("42501");
    // The columns the rpcs read are readable.
    expect(await outcome(sql`select id, name, version from api_keys where tenant_id = ${tenantId}`)).to.equal("ok");
  });

  it("may change only the kill switch of a key, and may not add, delete or rename keys, nor write the proxy's log", async () => {
    const sql = service.server.sql;
    const tenantId = newTenant();
    const keyId = await insertKey(service.db.sql, { tenantId, name: "before" });
    expect(await outcome(sql`update api_keys set name = 'after' where id = ${keyId}`)).to.equal("42501");
    expect(await outcome(sql`update api_keys set total_requests = 0 where id = ${keyId}`)).to.equal("42501");
    expect(await outcome(sql`update api_keys set status = 'revoked' where id = ${keyId}`)).to.equal("42501");
    expect(await outcome(sql`delete from api_keys where id = ${keyId}`)).to.equal("42501");
    expect(
      await outcome(
        sql`insert into api_keys (tenant_id, id, key_prefix, key_hash) values (${tenantId}, gen_random_uuid(), 'x', '\\x00')`,
      ),
    ).to.equal("42501");
    expect(await outcome(sql`truncate api_keys`)).to.equal("42501");
    expect(await outcome(sql`delete from proxy_calls`)).to.equal("42501");
    expect(await outcome(sql`update service_secrets set value = value`)).to.equal("42501");
    expect(await outcome(sql`delete from schema_migrations`)).to.equal("42501");
    const [row] = await service.db.sql`select name from api_keys where id = ${keyId}`;
    expect(row?.name).to.equal("before");
  });

  it("may not change the schema", async () => {
    const sql = service.server.sql;
    expect(await outcome(sql`create table intruder (id int)`)).to.equal("42501");
    expect(await outcome(sql`alter table api_keys add column intruder int`)).to.equal("42501");
    expect(await outcome(sql`drop table key_events`)).to.equal("42501");
    expect(await outcome(sql`create index intruder on api_keys (name)`)).to.equal("42501");
    expect(await outcome(sql`alter table api_keys disable trigger api_keys_record_update`)).to.equal("42501");
    expect(
      await outcome(sql`create or replace function epoch_micros(timestamptz) returns int8 language sql as 'select 0'`),
    ).to.equal("42501");
    expect(await outcome(sql`grant select on api_keys to public`)).to.equal("42501");
  });
});

import { expect } from "chai";
import { grpcJsCaller, type JsonCaller } from "./support/clients.js";
import { insertKey, newTenant } from "./support/fixtures.js";
import { useTestService } from "./support/service.js";

/** The value of the sample `name{labels}` in a Prometheus text exposition, or undefined. */
function sample(text: string, series: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

const fetchKey = 'grpc_service="keysdriver.v1.KeysDriverService",grpc_method="FetchKeyById",grpc_type="unary"';

describe("GET /metrics (prom-client)", () => {
  const service = useTestService();
  let client: JsonCaller;
  const scrape = async () => {
    const res = await fetch(`http://${service.server.address}/metrics`);
    expect(res.status).to.equal(200);
    expect(res.headers.get("content-type")).to.contain("text/plain");
    return res.text();
  };
  before(() => {
    client = grpcJsCaller(service.server.address);
  });
  after(() => client.close());

  it("counts calls by method and code, with a latency histogram per method", async () => {
    const tenantId = newTenant();
    const keyId = await insertKey(service.db.sql, { tenantId });
    const before = await scrape();
    for (let i = 0; i < 3; i++) await client.call("FetchKeyById", { tenantId, keyId });
    await client.call("FetchKeyById", { tenantId: newTenant(), keyId }).catch(() => undefined);
    const after = await scrape();
    const delta = (series: string) => (sample(after, series) ?? 0) - (sample(before, series) ?? 0);
    expect(delta(`grpc_server_handled_total{${fetchKey},grpc_code="OK"}`)).to.equal(3);
    expect(delta(`grpc_server_handled_total{${fetchKey},grpc_code="NOT_FOUND"}`)).to.equal(1);
    expect(delta(`grpc_server_handling_seconds_count{${fetchKey}}`)).to.equal(4);
    expect(delta(`grpc_server_handling_seconds_bucket{le="+Inf",${fetchKey}}`)).to.equal(4);
    expect(delta(`grpc_server_handling_seconds_sum{${fetchKey}}`)).to.be.greaterThan(0);
  });

  it("shows the pool, open watch streams, and the process", async () => {
    const tenantId = newTenant();
    const stream = client.open("WatchKeys", { tenantId });
    await stream.next();
    try {
      const text = await scrape();
      expect(sample(text, "keysdriver_watch_streams")).to.be.at.least(1);
      const connections = ["idle", "busy", "reserved", "connecting", "closed"].map(
        (state) => sample(text, `keysdriver_db_pool_connections{state="${state}"}`) ?? Number.NaN,
      );
      expect(connections.every(Number.isInteger), connections.join()).to.equal(true);
      // The feed's reader holds a connection of its own; the pool has opened some for the calls.
      expect(connections.slice(0, 3).reduce((a, b) => a + b)).to.be.at.least(1);
      expect(sample(text, "keysdriver_db_pool_waiting_statements")).to.equal(0);
      expect(sample(text, "keysdriver_processes")).to.equal(1);
      expect(sample(text, "process_resident_memory_bytes")).to.be.greaterThan(0);
    } finally {
      stream.cancel();
    }
  });

  it("counts statements waiting for a connection while the pool is busy", async () => {
    const tenantId = newTenant();
    const keyId = await insertKey(service.db.sql, { tenantId });
    const holder = await service.db.sql.reserve();
    const poolMax = 10;
    try {
      await holder`begin`;
      await holder`select 1 from api_keys where id = ${keyId} for update`;
      // More freezes than the pool has connections, all waiting on the lock.
      const calls = Array.from({ length: poolMax + 5 }, () =>
        client.call("UpdateKeyFrozen", { tenantId, keyId }, { timeoutMs: 3000 }).catch(() => undefined),
      );
      let waiting = 0;
      for (let i = 0; i < 40 && waiting === 0; i++) {
        await new Promise((r) => setTimeout(r, 50));
        waiting = sample(await scrape(), "keysdriver_db_pool_waiting_statements") ?? 0;
      }
      expect(waiting).to.be.greaterThan(0);
      await holder`rollback`;
      await Promise.all(calls);
    } finally {
      holder.release();
    }
  });
});

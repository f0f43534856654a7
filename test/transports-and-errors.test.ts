import { Code } from "@connectrpc/connect";
import { expect } from "chai";
import type { RunningService } from "../src/service.js";
import { connectProtocolCaller, grpcJsCaller, grpcWebCaller, RpcError } from "./support/clients.js";
import { insertKey, newTenant } from "./support/fixtures.js";
import { startTestService, useTestService } from "./support/service.js";

describe("one port for every protocol", () => {
  const service = useTestService();

  for (const makeCaller of [connectProtocolCaller, grpcWebCaller]) {
    it(`serves ${makeCaller === grpcWebCaller ? "gRPC-Web" : "the Connect protocol"} over HTTP/1.1 on the gRPC port`, async () => {
      const client = makeCaller(service.server.address);
      const tenantId = newTenant();
      const keyId = await insertKey(service.db.sql, { tenantId, name: "web" });
      const res = await client.call("FetchKeyById", { tenantId, keyId });
      expect(res.key).to.include({ id: keyId, name: "web" });
      try {
        await client.call("FetchKeyById", { tenantId: newTenant(), keyId });
        expect.fail("another tenant's key was returned");
      } catch (err) {
        expect((err as RpcError).code).to.equal(Code.NotFound);
      }
    });
  }
});

describe("when the database is out of reach", () => {
  let server: RunningService;

  before(async () => {
    // Nothing listens on port 1: every query fails to connect. The page
    // token secret is given, so the start itself needs no database.
    server = await startTestService("postgres://nobody@127.0.0.1:1/none", {
      poolMax: 1,
      pageTokenSecret: new Uint8Array(32),
    });
  });
  after(async () => {
    await server?.close(1000);
  });

  it("answers UNAVAILABLE, a status callers retry, without database details", async () => {
    const client = grpcJsCaller(server.address);
    try {
      await client.call("CountKeys", { tenantId: newTenant() });
      expect.fail("the call succeeded without a database");
    } catch (err) {
      expect(err).to.be.instanceOf(RpcError);
      expect((err as RpcError).code).to.equal(Code.Unavailable);
      expect((err as RpcError).rawMessage).to.equal("database unavailable");
    } finally {
      client.close();
    }
  });
});

import { Writable } from "node:stream";
import { fromBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { expect } from "chai";
import { RequestInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { createLogger } from "../src/log.js";
import type { RunningService } from "../src/service.js";
import { connectProtocolCaller, detailsOfStatus, failure, stringField } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { insertKey, newTenant } from "./support/fixtures.js";
import { startTestService } from "./support/service.js";

describe("the call log (pino)", () => {
  let db: TestDatabase;
  let service: RunningService;
  const lines: Record<string, unknown>[] = [];
  const raw: string[] = [];

  before(async () => {
    db = await createTestDatabase();
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        for (const line of chunk.toString().split("\n").filter(Boolean)) {
          raw.push(line);
          lines.push(JSON.parse(line) as Record<string, unknown>);
        }
        done();
      },
    });
    service = await startTestService(db.url, {}, { logger: createLogger("debug", sink) });
  });
  after(async () => {
    await service?.close(1000);
    await db?.drop();
  });

  const linesAbout = (requestId: string) => lines.filter((l) => l.request_id === requestId);

  it("writes one JSON line per failed call: method, code, reason, duration, request and trace ids, no values", async () => {
    const tenantId = newTenant();
    const keyId = await insertKey(db.sql, { tenantId, name: "secret-name" });
    const client = new grpc.Client(service.address, grpc.credentials.createInsecure());
    const metadata = new grpc.Metadata();
    metadata.set("x-request-id", "req-123");
    metadata.set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    const status = await new Promise<grpc.ServiceError>((resolve, reject) => {
      client.makeUnaryRequest(
        "/keysdriver.v1.KeysDriverService/FetchKeyById",
        (b: Buffer) => b,
        (b: Buffer) => b,
        // tenant_id = a tenant that does not own the key: NOT_FOUND
        Buffer.concat([stringField(1, newTenant()), stringField(2, keyId)]),
        metadata,
        (err) => (err ? resolve(err) : reject(new Error("the call succeeded"))),
      );
    });
    client.close();
    expect(status.code).to.equal(grpc.status.NOT_FOUND);
    const [line, ...more] = linesAbout("req-123");
    expect(more).to.have.length(0);
    expect(line).to.deep.include({
      level: "info",
      msg: "call failed",
      code: "NOT_FOUND",
      reason: "KEY_NOT_FOUND",
      trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
      span_id: "00f067aa0ba902b7",
    });
    expect(line?.rpc).to.deep.equal({
      service: "keysdriver.v1.KeysDriverService",
      method: "FetchKeyById",
      protocol: "grpc",
    });
    expect(line?.duration_ms).to.be.a("number");
    // The caller is told the id its failure was logged under.
    const details = detailsOfStatus(status.metadata.get("grpc-status-details-bin")[0] as Buffer);
    const info = details.find((d) => d.type === "google.rpc.RequestInfo");
    expect(info && fromBinary(RequestInfoSchema, info.value).requestId).to.equal("req-123");
    // Nothing the caller sent, nothing stored.
    for (const text of raw) {
      expect(text).to.not.contain(keyId);
      expect(text).to.not.contain("secret-name");
    }
  });

  it("makes a request id when the caller gives none (or an unusable one), and logs every call at debug", async () => {
    const client = connectProtocolCaller(service.address);
    const tenantId = newTenant();
    const before = lines.length;
    await client.call("CountKeys", { tenantId });
    const err = await failure(client.call("CountKeys", { tenantId: "not-a-uuid" }));
    const added = lines.slice(before).filter((l) => (l.rpc as { method?: string } | undefined)?.method === "CountKeys");
    expect(added.map((l) => [l.level, l.code])).to.deep.equal([
      ["debug", "OK"],
      ["info", "INVALID_ARGUMENT"],
    ]);
    const failed = added[1];
    expect(failed?.request_id).to.match(/^[0-9a-f-]{36}$/);
    expect(err.find(RequestInfoSchema)[0]?.requestId).to.equal(failed?.request_id);
    for (const text of raw) expect(text).to.not.contain(tenantId);
  });
});

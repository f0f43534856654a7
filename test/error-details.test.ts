import { execFile } from "node:child_process";
import http2 from "node:http2";
import path from "node:path";
import { promisify } from "node:util";
import { Code, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { expect } from "chai";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import {
  connectGrpcCaller,
  connectHttp2Caller,
  connectProtocolCaller,
  detailsOfStatus,
  failure,
  grpcJsCaller,
  grpcWebCaller,
  type JsonCaller,
  RpcError,
} from "./support/clients.js";
import { insertKey, newTenant } from "./support/fixtures.js";
import { startTestService, useTestService } from "./support/service.js";

const callers: [string, (address: string) => JsonCaller][] = [
  ["@grpc/grpc-js", grpcJsCaller],
  ["connect-node over gRPC", connectGrpcCaller],
  ["connect-node over the Connect protocol", connectProtocolCaller],
  ["connect-node over gRPC-Web", grpcWebCaller],
  ["connect-node over the Connect protocol on HTTP/2", connectHttp2Caller],
];

/** The one ErrorInfo an error must carry, in this service's domain. */
function errorInfo(err: RpcError) {
  const infos = err.find(ErrorInfoSchema);
  expect(infos, "one ErrorInfo").to.have.length(1);
  const [info] = infos;
  expect(info?.domain).to.equal("keysdriver.v1");
  return info;
}

function retryDelayMs(err: RpcError): number | undefined {
  const [retry, ...more] = err.find(RetryInfoSchema);
  expect(more, "at most one RetryInfo").to.have.length(0);
  if (!retry) return undefined;
  return Number(retry.retryDelay?.seconds ?? 0n) * 1000 + (retry.retryDelay?.nanos ?? 0) / 1e6;
}

describe("error details (google.rpc)", () => {
  const service = useTestService();

  for (const [name, makeCaller] of callers) {
    describe(`through ${name}`, () => {
      let client: JsonCaller;
      before(() => {
        client = makeCaller(service.server.address);
      });
      after(() => client.close());

      it("names the field of an INVALID_ARGUMENT in a BadRequest and an ErrorInfo", async () => {
        const err = await failure(client.call("FetchKeyById", { tenantId: newTenant(), keyId: "not-a-uuid" }));
        expect(err.code, err.message).to.equal(Code.InvalidArgument);
        const [badRequest] = err.find(BadRequestSchema);
        expect(badRequest?.fieldViolations.map((v) => ({ field: v.field, description: v.description }))).to.deep.equal([
          { field: "key_id", description: "must be a UUID" },
        ]);
        const info = errorInfo(err);
        expect(info?.reason).to.equal("INVALID_FIELD");
        expect(info?.metadata).to.deep.equal({ field: "key_id" });
        expect(retryDelayMs(err)).to.equal(undefined);
      });

      it("says which token is bad with its own reason", async () => {
        const err = await failure(client.call("FetchKeys", { tenantId: newTenant(), pageToken: "forged" }));
        expect(err.code).to.equal(Code.InvalidArgument);
        expect(errorInfo(err)?.reason).to.equal("INVALID_PAGE_TOKEN");
        expect(err.find(BadRequestSchema)[0]?.fieldViolations[0]?.field).to.equal("page_token");
      });

      it("gives another tenant's key KEY_NOT_FOUND, nothing more", async () => {
        const keyId = await insertKey(service.db.sql, { tenantId: newTenant(), name: "theirs" });
        const err = await failure(client.call("FetchKeyById", { tenantId: newTenant(), keyId }));
        expect(err.code).to.equal(Code.NotFound);
        expect(errorInfo(err)?.reason).to.equal("KEY_NOT_FOUND");
        expect(err.details.map((d) => d.type)).to.deep.equal(["google.rpc.ErrorInfo", "google.rpc.RequestInfo"]);
      });

      it("gives a stale etag ETAG_MISMATCH", async () => {
        const tenantId = newTenant();
        const keyId = await insertKey(service.db.sql, { tenantId, name: "busy" });
        const read = await client.call("FetchKeyForUpdate", { tenantId, keyId });
        await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "first" });
        const err = await failure(
          client.call("UpdateKeyUnfrozen", { tenantId, keyId, etag: (read.key as { etag: string }).etag }),
        );
        expect(err.code).to.equal(Code.Aborted);
        expect(errorInfo(err)?.reason).to.equal("ETAG_MISMATCH");
      });

      it("details a stream's error too (WatchKeys with a forged cursor)", async () => {
        const err = await failure(client.stream("WatchKeys", { tenantId: newTenant(), resumeCursor: "forged" }));
        expect(err.code).to.equal(Code.InvalidArgument);
        expect(errorInfo(err)?.reason).to.equal("INVALID_CURSOR");
        expect(err.find(BadRequestSchema)[0]?.fieldViolations[0]?.field).to.equal("resume_cursor");
      });

      it("marks a message over the size limit, which the transport refuses itself, MESSAGE_TOO_LARGE", async () => {
        const err = await failure(client.call("CountKeys", { tenantId: "x".repeat(5 * 1024 * 1024) }));
        expect(err.code).to.equal(Code.ResourceExhausted);
        expect(errorInfo(err)?.reason).to.equal("MESSAGE_TOO_LARGE");
        // The same message would fail the same way: no RetryInfo invites a retry.
        expect(retryDelayMs(err)).to.equal(undefined);
      });
    });
  }

  it("details an unknown method, which grpc-js answers itself", async () => {
    const client = new grpc.Client(service.server.address, grpc.credentials.createInsecure());
    try {
      const err = await new Promise<grpc.ServiceError>((resolve, reject) => {
        client.makeUnaryRequest(
          "/keysdriver.v1.KeysDriverService/NoSuchMethod",
          (b: Buffer) => b,
          (b: Buffer) => b,
          Buffer.alloc(0),
          (e) => (e ? resolve(e) : reject(new Error("an unknown method succeeded"))),
        );
      });
      expect(err.code).to.equal(grpc.status.UNIMPLEMENTED);
      const details = detailsOfStatus(err.metadata.get("grpc-status-details-bin")[0] as Buffer);
      expect(details.map((d) => d.type)).to.deep.equal(["google.rpc.ErrorInfo"]);
    } finally {
      client.close();
    }
  });

  it("answers a bad grpc-timeout and an undecompressable body INVALID_ARGUMENT on gRPC too (grpc-js says INTERNAL)", async () => {
    const session = http2.connect(`http://${service.server.address}`);
    const call = (headers: http2.OutgoingHttpHeaders, body: Buffer) =>
      new Promise<http2.IncomingHttpHeaders>((resolve, reject) => {
        const stream = session.request({
          ":method": "POST",
          ":path": "/keysdriver.v1.KeysDriverService/CountKeys",
          "content-type": "application/grpc",
          te: "trailers",
          ...headers,
        });
        let status: http2.IncomingHttpHeaders = {};
        stream.on("response", (h) => (status = h));
        stream.on("trailers", (t) => (status = t));
        stream.on("data", () => {});
        stream.on("close", () => resolve(status));
        stream.on("error", reject);
        stream.end(body);
      });
    try {
      const empty = Buffer.from([0, 0, 0, 0, 0]);
      const garbage = Buffer.concat([Buffer.from([1, 0, 0, 0, 4]), Buffer.from("nope")]);
      for (const [headers, body, reason] of [
        [{ "grpc-timeout": "abc" }, empty, "INVALID_HEADER"],
        [{ "grpc-encoding": "gzip" }, garbage, "MALFORMED_REQUEST"],
      ] as const) {
        const status = await call(headers, body);
        expect(status["grpc-status"], JSON.stringify(headers)).to.equal(String(grpc.status.INVALID_ARGUMENT));
        const bin = Buffer.from(String(status["grpc-status-details-bin"]), "base64");
        const err = new RpcError(Code.InvalidArgument, "", detailsOfStatus(bin));
        expect(errorInfo(err)?.reason).to.equal(reason);
        expect(err.find(BadRequestSchema)).to.have.length(1);
      }
    } finally {
      session.destroy();
    }
  });

  it("can be read by a client in another language (buf curl, Go)", async function () {
    this.timeout(30_000);
    const buf = path.resolve("node_modules/.bin/buf");
    const url = `http://${service.server.address}/keysdriver.v1.KeysDriverService/FetchKeyById`;
    const request = JSON.stringify({ tenantId: newTenant(), keyId: "not-a-uuid" });
    const args = ["curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", request, url];
    const err = await promisify(execFile)(buf, args).then(
      () => expect.fail("buf curl succeeded"),
      (e: { stderr: string }) => e,
    );
    // buf curl prints each detail's type and its bytes (base64).
    const printed = JSON.parse(err.stderr) as { code: string; details: { type: string; value: string }[] };
    expect(printed.code).to.equal("invalid_argument");
    const decoded = new RpcError(
      Code.InvalidArgument,
      "",
      printed.details.map((d) => ({ type: d.type, value: Buffer.from(d.value, "base64") })),
    );
    expect(decoded.find(BadRequestSchema)[0]?.fieldViolations[0]).to.include({
      field: "key_id",
      description: "must be a UUID",
    });
    expect(errorInfo(decoded)?.reason).to.equal("INVALID_FIELD");
  });
});

describe("error details when the database is out of reach", () => {
  for (const [name, makeCaller] of callers) {
    it(`tell when to retry an UNAVAILABLE (${name})`, async () => {
      // Nothing listens on port 1: every query fails to connect. A server
      // each: postgres.js waits longer before each new attempt to connect.
      const server = await startTestService("postgres://nobody@127.0.0.1:1/none", {
        poolMax: 1,
        pageTokenSecret: new Uint8Array(32),
      });
      const client = makeCaller(server.address);
      try {
        const err = await failure(client.call("CountKeys", { tenantId: newTenant() }));
        expect(err.code).to.equal(Code.Unavailable);
        expect(errorInfo(err)?.reason).to.equal("DATABASE_UNAVAILABLE");
        expect(retryDelayMs(err)).to.equal(1000);
      } finally {
        client.close();
        await server.close(1000);
      }
    });
  }
});

describe("calls past the process's cap on calls in flight", () => {
  const service = useTestService({ connectionLimits: { maxCallsInFlight: 2 } });

  it("are answered RESOURCE_EXHAUSTED at once with RetryInfo, health checks still served, and the rest recover", async () => {
    const tenantId = newTenant();
    const keyId = await insertKey(service.db.sql, { tenantId });
    const client = grpcJsCaller(service.server.address);
    try {
      // Two freezes wait for a row lock held elsewhere: the cap is reached.
      const held = await service.db.sql.reserve();
      await held`begin`;
      await held`select 1 from api_keys where id = ${keyId} for update`;
      const waiting = [
        client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "a" }),
        client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "b" }),
      ];
      for (;;) {
        const [row]: [{ n: number }?] = await service.db.sql`
          select count(*)::int4 as n from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()
        `;
        if ((row?.n ?? 0) >= 2) break;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const started = performance.now();
      const err = await failure(client.call("CountKeys", { tenantId }));
      expect(performance.now() - started).to.be.below(1000);
      expect(err.code, err.message).to.equal(Code.ResourceExhausted);
      expect(errorInfo(err)?.reason).to.equal("OVERLOADED");
      expect(retryDelayMs(err)).to.equal(100);
      const health = createClient(Health, createGrpcTransport({ baseUrl: `http://${service.server.address}` }));
      expect((await health.check({})).status).to.equal(HealthCheckResponse_ServingStatus.SERVING);
      await held`rollback`;
      held.release();
      const answers = await Promise.all(waiting);
      // One froze the key; the other found it frozen (changed is false, left out of JSON).
      expect(answers.map((a) => a.changed === true).sort()).to.deep.equal([false, true]);
      expect(await client.call("CountKeys", { tenantId })).to.deep.equal({ count: "1" });
    } finally {
      client.close();
    }
  });
});

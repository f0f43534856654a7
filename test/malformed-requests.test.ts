import http2 from "node:http2";
import { gzipSync } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import { expect } from "chai";
import { FetchKeyByIdRequestSchema } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { newTenant } from "./support/fixtures.js";
import { useTestService } from "./support/service.js";

// Bodies a decoder must refuse, each answered INVALID_ARGUMENT (gRPC code 3)
// on every protocol, never INTERNAL, and counted in the metrics.
const valid = toBinary(
  FetchKeyByIdRequestSchema,
  create(FetchKeyByIdRequestSchema, { tenantId: newTenant(), keyId: "00000000-0000-4000-8000-000000000000" }),
);
const bodies: Record<string, Uint8Array> = {
  // Field 1 (tenant_id) says 100 bytes follow; there are 3.
  "a truncated length-delimited field": Uint8Array.from([0x0a, 100, 0x61, 0x62, 0x63]),
  // Field 1 as a string holding bytes that are not UTF-8.
  "invalid UTF-8 in a string": Uint8Array.from([0x0a, 3, 0xff, 0xfe, 0xfd]),
  // Field 1 (a string) sent as a varint.
  "a wrong wire type": Uint8Array.from([0x08, 0x01]),
  // A varint of 11 bytes.
  "an overlong varint": Uint8Array.from([0x10, ...Array(10).fill(0xff), 0x01]),
  // Wire type 7 does not exist.
  "an unknown wire type": Uint8Array.from([0x0f, ...valid]),
};

const path = "/keysdriver.v1.KeysDriverService/FetchKeyById";

function enveloped(body: Uint8Array, flags = 0): Buffer {
  const out = Buffer.alloc(5 + body.length);
  out[0] = flags;
  out.writeUInt32BE(body.length, 1);
  out.set(body, 5);
  return out;
}

/** One gRPC call over HTTP/2; its grpc-status and grpc-message. */
async function grpcCall(
  address: string,
  body: Uint8Array,
  headers: Record<string, string> = {},
  flags = 0,
): Promise<{ status: string; message: string }> {
  const session = http2.connect(`http://${address}`);
  try {
    return await new Promise((resolve, reject) => {
      const req = session.request({
        ":method": "POST",
        ":path": path,
        "content-type": "application/grpc",
        te: "trailers",
        ...headers,
      });
      let responseHeaders: http2.IncomingHttpHeaders = {};
      req.on("response", (h) => {
        responseHeaders = h;
      });
      req.on("trailers", (t) =>
        resolve({ status: String(t["grpc-status"]), message: String(t["grpc-message"] ?? "") }),
      );
      req.on("end", () => {
        // A trailers-only answer carries the status in the headers.
        if (responseHeaders["grpc-status"] !== undefined) {
          resolve({
            status: String(responseHeaders["grpc-status"]),
            message: decodeURIComponent(String(responseHeaders["grpc-message"] ?? "")),
          });
        }
      });
      req.on("error", reject);
      req.resume();
      req.end(enveloped(body, flags));
    });
  } finally {
    session.close();
  }
}

async function connectCall(address: string, body: Uint8Array | string, contentType: string) {
  const res = await fetch(`http://${address}${path}`, {
    method: "POST",
    headers: { "content-type": contentType },
    body,
  });
  return { httpStatus: res.status, error: (await res.json()) as { code: string; message: string } };
}

async function grpcWebCall(address: string, body: Uint8Array) {
  const res = await fetch(`http://${address}${path}`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+proto" },
    body: enveloped(body),
  });
  const bytes = Buffer.from(await res.arrayBuffer());
  const text = res.headers.get("grpc-status") !== null ? "" : bytes.subarray(5).toString();
  const status = res.headers.get("grpc-status") ?? /grpc-status: *(\d+)/.exec(text)?.[1];
  const message = res.headers.get("grpc-message") ?? /grpc-message: *(.*)/.exec(text)?.[1] ?? "";
  return { status, message: decodeURIComponent(message.trim()) };
}

describe("a request body that does not decode", () => {
  const service = useTestService();

  for (const [name, body] of Object.entries(bodies)) {
    it(`is INVALID_ARGUMENT on every protocol: ${name}`, async () => {
      const address = service.server.address;
      const grpc = await grpcCall(address, body);
      expect(grpc.status).to.equal("3");
      expect(grpc.message).to.include("request body").and.include("keysdriver.v1.FetchKeyByIdRequest");

      const connect = await connectCall(address, body, "application/proto");
      expect(connect.httpStatus).to.equal(400);
      expect(connect.error.code).to.equal("invalid_argument");
      expect(connect.error.message).to.include("request body");

      const web = await grpcWebCall(address, body);
      expect(web.status).to.equal("3");
      expect(web.message).to.include("request body");
    });
  }

  it("is INVALID_ARGUMENT as Connect JSON of the wrong shape", async () => {
    for (const body of ['{"tenantId": 5}', '{"tenantId": "a", "unknownField": 1}', "{not json", '"a string"']) {
      const connect = await connectCall(service.server.address, body, "application/json");
      expect(connect.httpStatus, body).to.equal(400);
      expect(connect.error.code, body).to.equal("invalid_argument");
    }
  });

  it("is counted in the metrics, by method, as INVALID_ARGUMENT", async () => {
    const metrics = async () => {
      const text = await (await fetch(`http://${service.server.address}/metrics`)).text();
      const line = text
        .split("\n")
        .find((l) =>
          l.startsWith(
            'grpc_server_handled_total{grpc_service="keysdriver.v1.KeysDriverService",grpc_method="FetchKeyById",grpc_type="unary",grpc_code="INVALID_ARGUMENT"}',
          ),
        );
      return Number(line?.split(" ").at(-1) ?? 0);
    };
    const before = await metrics();
    await grpcCall(service.server.address, bodies["a wrong wire type"] as Uint8Array);
    await connectCall(service.server.address, bodies["a wrong wire type"] as Uint8Array, "application/proto");
    await grpcWebCall(service.server.address, bodies["a wrong wire type"] as Uint8Array);
    expect((await metrics()) - before).to.equal(3);
  });
});

describe("a request larger than the limit once decompressed", () => {
  const service = useTestService();
  // 5 MiB of a repeated string field, gzipped to a few kilobytes.
  const huge = toBinary(
    FetchKeyByIdRequestSchema,
    create(FetchKeyByIdRequestSchema, { tenantId: newTenant(), keyId: "x".repeat(5 * 1024 * 1024) }),
  );
  const bomb = gzipSync(huge);

  it("is RESOURCE_EXHAUSTED on every protocol, gzipped or not, and the server serves on", async () => {
    const address = service.server.address;
    expect(bomb.length).to.be.below(20_000);
    const grpc = await grpcCall(address, bomb, { "grpc-encoding": "gzip" }, 1);
    expect(grpc.status).to.equal("8");
    expect((await grpcCall(address, huge)).status).to.equal("8");

    for (const [body, headers] of [
      [bomb, { "content-encoding": "gzip" }],
      [huge, {}],
    ] as const) {
      const res = await fetch(`http://${address}${path}`, {
        method: "POST",
        headers: { "content-type": "application/proto", ...headers },
        body,
      });
      expect(res.status).to.equal(429);
      expect(((await res.json()) as { code: string }).code).to.equal("resource_exhausted");
    }

    const res = await fetch(`http://${address}${path}`, {
      method: "POST",
      headers: { "content-type": "application/grpc-web+proto", "grpc-encoding": "gzip" },
      body: enveloped(bomb, 1),
    });
    const trailer = Buffer.from(await res.arrayBuffer()).toString();
    expect(res.headers.get("grpc-status") ?? /grpc-status: *(\d+)/.exec(trailer)?.[1]).to.equal("8");

    const fine = await grpcCall(address, valid);
    expect(fine.status).to.equal("5"); // NOT_FOUND: an unknown key, decoded and served
  });
});

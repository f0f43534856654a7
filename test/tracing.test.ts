import http from "node:http";
import type { AddressInfo } from "node:net";
import { create, toBinary } from "@bufbuild/protobuf";
import { type Client, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { SpanKind, SpanStatusCode } from "@opentelemetry/api";
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from "@opentelemetry/sdk-trace-base";
import { expect } from "chai";
import { CountKeysRequestSchema, KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import type { RunningService } from "../src/service.js";
import { tracingFromEnv } from "../src/tracing.js";
import { stringField } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { insertKey, newTenant } from "./support/fixtures.js";
import { startMain, startTestService } from "./support/service.js";

const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
const callerSpanId = "00f067aa0ba902b7";
const traceparent = `00-${traceId}-${callerSpanId}-01`;

const withTraceparent: Interceptor = (next) => (req) => {
  req.header.set("traceparent", traceparent);
  return next(req);
};

/** FetchKeyById with a traceparent, through each protocol; resolves when the call has ended (either way). */
const protocols: [string, (address: string, tenantId: string, keyId: string) => Promise<unknown>][] = [
  [
    "gRPC (@grpc/grpc-js)",
    (address, tenantId, keyId) => {
      const client = new grpc.Client(address, grpc.credentials.createInsecure());
      const metadata = new grpc.Metadata();
      metadata.set("traceparent", traceparent);
      const body = Buffer.concat([stringField(1, tenantId), stringField(2, keyId)]);
      return new Promise((resolve) => {
        client.makeUnaryRequest(
          "/keysdriver.v1.KeysDriverService/FetchKeyById",
          (b: Buffer) => b,
          (b: Buffer) => b,
          body,
          metadata,
          () => {
            client.close();
            resolve(undefined);
          },
        );
      });
    },
  ],
  ["Connect over HTTP/1.1", (a, t, k) => fetchKey(createConnectTransport({ ...traced(a), httpVersion: "1.1" }), t, k)],
  ["Connect over HTTP/2", (a, t, k) => fetchKey(createConnectTransport({ ...traced(a), httpVersion: "2" }), t, k)],
  ["gRPC-Web", (a, t, k) => fetchKey(createGrpcWebTransport({ ...traced(a), httpVersion: "1.1" }), t, k)],
  [
    "gRPC (connect-node)",
    (a, t, k) => fetchKey(createGrpcTransport({ baseUrl: `http://${a}`, interceptors: [withTraceparent] }), t, k),
  ],
];

function traced(address: string) {
  return { baseUrl: `http://${address}`, interceptors: [withTraceparent] };
}

async function fetchKey(transport: Transport, tenantId: string, keyId: string): Promise<unknown> {
  const client: Client<typeof KeysDriverService> = createClient(KeysDriverService, transport);
  return client.fetchKeyById({ tenantId, keyId }).catch(() => undefined);
}

describe("tracing (OpenTelemetry)", () => {
  let db: TestDatabase;
  let service: RunningService;
  const exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });

  before(async () => {
    db = await createTestDatabase();
    service = await startTestService(db.url, {}, { tracer: provider.getTracer("test") });
  });
  after(async () => {
    await service?.close(1000);
    await db?.drop();
    await provider.shutdown();
  });
  beforeEach(() => exporter.reset());

  const serverSpans = () => exporter.getFinishedSpans().filter((s) => s.kind === SpanKind.SERVER);
  const childrenOf = (parent: ReadableSpan) =>
    exporter.getFinishedSpans().filter((s) => s.parentSpanContext?.spanId === parent.spanContext().spanId);

  for (const [name, call] of protocols) {
    it(`makes the rpc a child of the caller's traceparent, with a span per statement (${name})`, async () => {
      const tenantId = newTenant();
      const keyId = await insertKey(db.sql, { tenantId, name: "traced" });
      await call(service.address, tenantId, keyId);
      const [span, ...more] = serverSpans();
      expect(more, "one server span").to.have.length(0);
      expect(span?.name).to.equal("keysdriver.v1.KeysDriverService/FetchKeyById");
      expect(span?.spanContext().traceId).to.equal(traceId);
      expect(span?.parentSpanContext?.spanId).to.equal(callerSpanId);
      expect(span?.attributes).to.include({
        "rpc.service": "keysdriver.v1.KeysDriverService",
        "rpc.method": "FetchKeyById",
        "rpc.grpc.status_code": 0,
      });
      const statements = span ? childrenOf(span) : [];
      expect(statements.length).to.be.at.least(1);
      for (const statement of statements) {
        expect(statement.kind).to.equal(SpanKind.CLIENT);
        expect(statement.attributes["db.system.name"]).to.equal("postgresql");
        const text = String(statement.attributes["db.query.text"]);
        expect(text).to.match(/api_keys/);
        // The statement's text has placeholders, never the values.
        expect(text).to.not.contain(keyId);
        expect(text).to.not.contain(tenantId);
      }
    });
  }

  it("marks a caller's mistake as no error of the server, and records its status", async () => {
    await protocols[0]?.[1](service.address, newTenant(), "not-a-uuid");
    const [span] = serverSpans();
    expect(span?.attributes["rpc.grpc.status_code"]).to.equal(3);
    expect(span?.attributes["error.type"]).to.equal("INVALID_FIELD");
    expect(span?.status.code).to.not.equal(SpanStatusCode.ERROR);
  });

  it("starts a new trace when the caller sends none", async () => {
    const client = createClient(
      KeysDriverService,
      createConnectTransport({ baseUrl: `http://${service.address}`, httpVersion: "1.1" }),
    );
    await client.countKeys({ tenantId: newTenant() });
    const [span] = serverSpans();
    expect(span?.spanContext().traceId).to.match(/^[0-9a-f]{32}$/);
    expect(span?.spanContext().traceId).to.not.equal(traceId);
    expect(span?.parentSpanContext).to.equal(undefined);
  });
});

describe("tracing configuration", () => {
  it("does not hold up the process's stop when the collector cannot be reached", async function () {
    this.timeout(40_000);
    const db = await createTestDatabase();
    const { child, exited, listening } = startMain({
      DATABASE_URL: db.url,
      OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:1",
    });
    try {
      const port = await listening;
      for (let i = 0; i < 5; i++) {
        await fetch(`http://127.0.0.1:${port}/keysdriver.v1.KeysDriverService/CountKeys`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ tenantId: newTenant() }),
        });
      }
      const stopping = performance.now();
      child.kill("SIGTERM");
      expect(await exited).to.equal(0);
      expect(performance.now() - stopping).to.be.below(6000);
    } finally {
      child.kill("SIGKILL");
      await db.drop();
    }
  });

  it("is off unless an OTLP endpoint is configured", async () => {
    expect(await tracingFromEnv({})).to.equal(undefined);
    expect(
      await tracingFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:1", OTEL_SDK_DISABLED: "true" }),
    ).to.equal(undefined);
  });

  it("exports spans over OTLP (HTTP/protobuf) to OTEL_EXPORTER_OTLP_ENDPOINT", async () => {
    const received: { path: string | undefined; type: string | undefined; body: Buffer }[] = [];
    const collector = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        received.push({ path: req.url, type: req.headers["content-type"], body: Buffer.concat(chunks) });
        res.writeHead(200, { "content-type": "application/x-protobuf" }).end();
      });
    });
    await new Promise<void>((resolve) => collector.listen(0, "127.0.0.1", resolve));
    const db = await createTestDatabase();
    const endpoint = `http://127.0.0.1:${(collector.address() as AddressInfo).port}`;
    const tracing = await tracingFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: endpoint });
    expect(tracing).to.not.equal(undefined);
    const service = await startTestService(db.url, {}, { tracer: tracing?.tracer });
    try {
      const res = await fetch(`http://${service.address}/keysdriver.v1.KeysDriverService/CountKeys`, {
        method: "POST",
        headers: { "content-type": "application/proto", traceparent },
        body: toBinary(CountKeysRequestSchema, create(CountKeysRequestSchema, { tenantId: newTenant() })),
      });
      expect(res.status).to.equal(200);
    } finally {
      await service.close(1000);
      await tracing?.shutdown(); // sends what is buffered
      await db.drop();
      collector.close();
    }
    const exported = received.find((r) => r.path === "/v1/traces");
    expect(exported?.type).to.equal("application/x-protobuf");
    expect(exported?.body.includes(Buffer.from("keysdriver.v1.KeysDriverService/CountKeys"))).to.equal(true);
    expect(exported?.body.includes(Buffer.from(traceId, "hex"))).to.equal(true);
  });
});

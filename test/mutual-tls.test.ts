import http2 from "node:http2";
import tls from "node:tls";
import type { JsonObject } from "@bufbuild/protobuf";
import { createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { expect } from "chai";
import { ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { ConfigError, loadConfig } from "../src/config.js";
import type { RunningService } from "../src/service.js";
import { createTestCa, type Issued, type TestCa, tempFolder } from "./support/certificates.js";
import { connectCaller, failure, grpcJsCaller, type JsonCaller, type RpcError } from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { insertKey, newTenant } from "./support/fixtures.js";
import { startTestService } from "./support/service.js";

const gateway = "spiffe://platform.internal/ns/prod/sa/gateway";
const billing = "spiffe://platform.internal/ns/prod/sa/billing";
const consoleId = "console.platform.internal";

const policy = {
  callers: [
    { identity: gateway, methods: ["FetchKeyById", "FetchKeys", "WatchKeys"], allTenants: true },
    { identity: billing, methods: ["FetchKeyUsage", "WatchKeys"] },
    { identity: consoleId, methods: ["*"] },
  ],
};

const reasonOf = (err: RpcError) => err.find(ErrorInfoSchema)[0]?.reason;

/** The rpc callers of every protocol, over TLS, presenting `client` (or no certificate). */
function callersOver(address: string, ca: string, client?: Issued): JsonCaller[] {
  const baseUrl = `https://${address}`;
  const tls = { ca, ...(client ? { cert: client.cert, key: client.key } : {}) };
  const transports: [string, Transport][] = [
    ["connect-node gRPC (h2)", createGrpcTransport({ baseUrl, nodeOptions: tls })],
    ["connect-node Connect (h2)", createConnectTransport({ baseUrl, httpVersion: "2", nodeOptions: tls })],
    ["connect-node Connect (HTTP/1.1)", createConnectTransport({ baseUrl, httpVersion: "1.1", nodeOptions: tls })],
    ["connect-node gRPC-Web (HTTP/1.1)", createGrpcWebTransport({ baseUrl, httpVersion: "1.1", nodeOptions: tls })],
  ];
  const credentials = grpc.credentials.createSsl(
    Buffer.from(ca),
    client ? Buffer.from(client.key) : null,
    client ? Buffer.from(client.cert) : null,
  );
  return [...transports.map(([name, t]) => connectCaller(name, t)), grpcJsCaller(address, credentials)];
}

/** Waits for `condition` to hold; it may throw meanwhile, and the last error is reported. */
/** One caller (connect-node's gRPC) over TLS. */
const firstCallerOver = (address: string, ca: string, client?: Issued) =>
  callersOver(address, ca, client)[0] as JsonCaller;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(condition: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  let last: unknown;
  const holds = () =>
    condition().catch((err: unknown) => {
      last = err;
      return false;
    });
  while (!(await holds())) {
    if (Date.now() > deadline) throw new Error(`the condition did not hold in time (last: ${last})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("mutual TLS and the per-method policy", () => {
  let db: TestDatabase;
  let server: RunningService;
  let ca: TestCa;
  let files: Awaited<ReturnType<typeof tempFolder>>;
  let paths: { cert: string; key: string; clientCa: string; policy: string };
  const certs = {} as Record<"gateway" | "billing" | "console" | "unnamed" | "expired" | "foreign", Issued>;
  const tenant = newTenant();
  const otherTenant = newTenant();
  let keyId: string;
  let otherKeyId: string;
  const loggedErrors: string[] = [];

  before(async () => {
    db = await createTestDatabase();
    ca = await createTestCa("Platform test CA");
    const foreignCa = await createTestCa("Some other CA");
    const serverCert = await ca.issue({ server: true, ips: ["127.0.0.1"], dnsNames: ["localhost"] });
    certs.gateway = await ca.issue({ uris: [gateway] });
    certs.billing = await ca.issue({ uris: [billing], dnsNames: ["billing.internal"] });
    certs.console = await ca.issue({ dnsNames: [consoleId] });
    certs.unnamed = await ca.issue({});
    certs.expired = await ca.issue({
      dnsNames: [consoleId],
      notBefore: new Date(Date.now() - 7 * 86_400_000),
      notAfter: new Date(Date.now() - 86_400_000),
    });
    certs.foreign = await foreignCa.issue({ dnsNames: [consoleId] });
    files = await tempFolder();
    paths = {
      cert: await files.write("server.pem", serverCert.cert),
      key: await files.write("server-key.pem", serverCert.key),
      clientCa: await files.write("client-ca.pem", ca.cert),
      policy: await files.write("policy.json", JSON.stringify(policy)),
    };
    server = await startTestService(
      db.url,
      {
        tls: { certFile: paths.cert, keyFile: paths.key, clientCaFile: paths.clientCa },
        authPolicyFile: paths.policy,
        tlsReloadIntervalMs: 100,
      },
      { logError: (message) => loggedErrors.push(message) },
    );
    keyId = await insertKey(db.sql, { tenantId: tenant, name: "checkout" });
    otherKeyId = await insertKey(db.sql, { tenantId: otherTenant, name: "theirs" });
  });

  after(async () => {
    await server?.close(1000);
    await db?.drop();
    await files?.remove();
  });

  it("answers a caller without a client certificate UNAUTHENTICATED, on every protocol", async () => {
    for (const caller of callersOver(server.address, ca.cert)) {
      const err = await failure(caller.call("FetchKeyById", { tenantId: tenant, keyId }));
      expect(err.code, caller.name).to.equal(grpc.status.UNAUTHENTICATED);
      expect(reasonOf(err), caller.name).to.equal("CLIENT_CERTIFICATE_REQUIRED");
      caller.close();
    }
  });

  it("answers a certificate from another CA, or an expired one, UNAUTHENTICATED", async () => {
    for (const cert of [certs.foreign, certs.expired]) {
      for (const caller of callersOver(server.address, ca.cert, cert)) {
        const err = await failure(caller.call("FetchKeyById", { tenantId: tenant, keyId }));
        expect(err.code, caller.name).to.equal(grpc.status.UNAUTHENTICATED);
        caller.close();
      }
    }
  });

  it("lets each caller call what the policy grants it, and answers PERMISSION_DENIED for the rest", async () => {
    for (const caller of callersOver(server.address, ca.cert, certs.gateway)) {
      const read = await caller.call("FetchKeyById", { tenantId: tenant, keyId });
      expect((read.key as JsonObject).name, caller.name).to.equal("checkout");
      const err = await failure(caller.call("UpdateKeyFrozen", { tenantId: tenant, keyId }));
      expect(err.code, caller.name).to.equal(grpc.status.PERMISSION_DENIED);
      expect(reasonOf(err), caller.name).to.equal("METHOD_NOT_ALLOWED");
      expect(err.rawMessage).to.include(gateway).and.include("UpdateKeyFrozen");
      caller.close();
    }
    for (const caller of callersOver(server.address, ca.cert, certs.billing)) {
      const err = await failure(caller.call("FetchKeyById", { tenantId: tenant, keyId }));
      expect(err.code, caller.name).to.equal(grpc.status.PERMISSION_DENIED);
      caller.close();
    }
    // A verified certificate with no name the policy lists: no grant at all.
    for (const caller of callersOver(server.address, ca.cert, certs.unnamed)) {
      const err = await failure(caller.call("FetchKeyById", { tenantId: tenant, keyId }));
      expect(err.code, caller.name).to.equal(grpc.status.PERMISSION_DENIED);
      caller.close();
    }
  });

  it("checks the caller before the request: a denied caller learns nothing from a bad request", async () => {
    const caller = firstCallerOver(server.address, ca.cert, certs.billing);
    const err = await failure(caller.call("UpdateKeyFrozen", { tenantId: "not a uuid", keyId: "" }));
    expect(err.code).to.equal(grpc.status.PERMISSION_DENIED);
    caller.close();
  });

  it("lets only a caller granted allTenants watch every tenant at once", async () => {
    for (const caller of callersOver(server.address, ca.cert, certs.billing)) {
      const err = await failure(caller.stream("WatchKeys", { allTenants: true }));
      expect(err.code, caller.name).to.equal(grpc.status.PERMISSION_DENIED);
      expect(reasonOf(err), caller.name).to.equal("ALL_TENANTS_NOT_ALLOWED");
      // Its own grant, one tenant at a time, stands.
      const stream = caller.open("WatchKeys", { tenantId: tenant });
      expect((await stream.next())?.marker, caller.name).to.equal("WATCH_MARKER_PROGRESS");
      stream.cancel();
      caller.close();
    }
    for (const caller of callersOver(server.address, ca.cert, certs.gateway)) {
      const stream = caller.open("WatchKeys", { allTenants: true });
      expect((await stream.next())?.marker, caller.name).to.equal("WATCH_MARKER_PROGRESS");
      stream.cancel();
      caller.close();
    }
  });

  it("keeps every caller to the tenant it names: another tenant's key is NOT_FOUND", async () => {
    for (const caller of callersOver(server.address, ca.cert, certs.console)) {
      const err = await failure(caller.call("FetchKeyById", { tenantId: tenant, keyId: otherKeyId }));
      expect(err.code, caller.name).to.equal(grpc.status.NOT_FOUND);
      const freeze = await failure(caller.call("UpdateKeyFrozen", { tenantId: tenant, keyId: otherKeyId }));
      expect(freeze.code, caller.name).to.equal(grpc.status.NOT_FOUND);
      caller.close();
    }
    const [row] = await db.sql`select is_frozen from api_keys where id = ${otherKeyId}`;
    expect(row?.is_frozen).to.equal(false);
  });

  it("records the caller's identity as the actor of a freeze that names none", async () => {
    const caller = firstCallerOver(server.address, ca.cert, certs.console);
    const frozen = await caller.call("UpdateKeyFrozen", { tenantId: tenant, keyId, reason: "leaked" });
    expect((frozen.key as JsonObject).freezeActor).to.equal(consoleId);
    const unfrozen = await caller.call("UpdateKeyUnfrozen", { tenantId: tenant, keyId });
    expect(unfrozen.changed).to.equal(true);
    const named = await caller.call("UpdateKeyFrozen", { tenantId: tenant, keyId, actor: "alice@example.com" });
    expect((named.key as JsonObject).freezeActor).to.equal("alice@example.com");
    const changes = await caller.call("ListKeyChanges", { tenantId: tenant, keyId });
    const actors = (changes.changes as JsonObject[]).map((c) => c.actor);
    expect(actors.slice(0, 3)).to.deep.equal(["alice@example.com", consoleId, consoleId]);
    await caller.call("UpdateKeyUnfrozen", { tenantId: tenant, keyId, actor: "alice@example.com" });
    caller.close();
  });

  it("answers health checks without a client certificate (probes have none)", async () => {
    const client = createClient(
      Health,
      createGrpcTransport({ baseUrl: `https://${server.address}`, nodeOptions: { ca: ca.cert } }),
    );
    expect((await client.check({})).status).to.equal(HealthCheckResponse_ServingStatus.SERVING);
    const res = await fetch(`https://${server.address}/readyz`).catch((err: Error) => err);
    // fetch does not trust the test CA; Node's https does.
    expect(res).to.be.instanceOf(Error);
  });

  it("serves only TLS: a plaintext client is not answered", async () => {
    const err = await failure(
      grpcJsCaller(server.address).call("FetchKeyById", { tenantId: tenant, keyId }, { timeoutMs: 2000 }),
    );
    expect(err.code).to.be.oneOf([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);
  });

  it("negotiates h2 and http/1.1 by ALPN", async () => {
    const session = http2.connect(`https://${server.address}`, { ca: ca.cert });
    await new Promise<void>((resolve, reject) => session.once("connect", () => resolve()).once("error", reject));
    expect(session.alpnProtocol).to.equal("h2");
    session.close();
  });

  it("refuses TLS renegotiation: a caller cannot change its certificate on a connection", async () => {
    const socket = tls.connect({
      host: "127.0.0.1",
      port: server.port,
      ca: ca.cert,
      cert: certs.gateway.cert,
      key: certs.gateway.key,
      maxVersion: "TLSv1.2",
      ALPNProtocols: ["http/1.1"],
    });
    socket.on("error", () => {});
    await new Promise<void>((resolve, reject) => socket.once("secureConnect", resolve).once("error", reject));
    // Refused by the server (with an alert, or by closing the connection): the
    // client's renegotiation never completes, so its second certificate is never taken.
    const outcome = await Promise.race([
      new Promise<string>((resolve) => {
        const asked = socket.renegotiate({ rejectUnauthorized: true }, (err) =>
          resolve(err ? "failed" : "renegotiated"),
        );
        if (!asked) resolve("not sent");
      }),
      new Promise<string>((resolve) => socket.once("close", () => resolve("closed"))),
      sleep(3000).then(() => "no answer"),
    ]);
    expect(outcome).to.not.equal("renegotiated");
    socket.destroy();
  });

  it("names a caller by its first URI name, else its first DNS name (in any case), never by another of its names", async () => {
    // A URI the policy does not list, beside a DNS name it does: the URI is the identity, and it has no grant.
    const unlisted = await ca.issue({ uris: ["spiffe://platform.internal/unlisted"], dnsNames: [consoleId] });
    const denied = await failure(
      firstCallerOver(server.address, ca.cert, unlisted).call("FetchKeyById", { tenantId: tenant, keyId }),
    );
    expect(denied.code).to.equal(grpc.status.PERMISSION_DENIED);
    expect(denied.rawMessage).to.include("spiffe://platform.internal/unlisted");
    const upper = await ca.issue({ dnsNames: [consoleId.toUpperCase()] });
    const read = await firstCallerOver(server.address, ca.cert, upper).call("FetchKeyById", {
      tenantId: tenant,
      keyId,
    });
    expect((read.key as JsonObject).id).to.equal(keyId);
  });

  it("ends an open stream PERMISSION_DENIED once a new policy denies its caller", async () => {
    const streams = callersOver(server.address, ca.cert, certs.gateway).map((caller) => ({
      caller,
      stream: caller.open("WatchKeys", { tenantId: tenant }),
    }));
    for (const { stream } of streams) expect((await stream.next())?.marker).to.equal("WATCH_MARKER_PROGRESS");
    const without = { callers: policy.callers.filter((c) => c.identity !== gateway) };
    await files.write("policy.json", JSON.stringify(without));
    // A change after the reload: the revoked caller's streams end instead of carrying it.
    await until(async () => {
      const [c] = callersOver(server.address, ca.cert, certs.gateway);
      try {
        return (await failure((c as JsonCaller).call("FetchKeyById", { tenantId: tenant, keyId }))).code === 7;
      } finally {
        c?.close();
      }
    });
    const writer = firstCallerOver(server.address, ca.cert, certs.console);
    await writer.call("UpdateKeyFrozen", { tenantId: tenant, keyId, reason: "after the revocation" });
    for (const { caller, stream } of streams) {
      const err = await failure(stream.next(5000));
      expect(err.code, caller.name).to.equal(grpc.status.PERMISSION_DENIED);
      caller.close();
    }
    await writer.call("UpdateKeyUnfrozen", { tenantId: tenant, keyId });
    writer.close();
    await files.write("policy.json", JSON.stringify(policy));
    await until(async () => {
      const [c] = callersOver(server.address, ca.cert, certs.gateway);
      try {
        return (await (c as JsonCaller).call("FetchKeyById", { tenantId: tenant, keyId })).key !== undefined;
      } finally {
        c?.close();
      }
    });
  });

  it("takes a renewed certificate even while the policy file is broken", async () => {
    loggedErrors.length = 0;
    await files.write("policy.json", "{ not json");
    await until(async () => loggedErrors.some((m) => m.includes("access policy")));
    const renewed = await ca.issue({ server: true, ips: ["127.0.0.1"], dnsNames: ["renewed.local"] });
    await files.write("server-key.pem", renewed.key);
    await files.write("server.pem", renewed.cert);
    await until(async () => {
      const socket = tls.connect({ host: "127.0.0.1", port: server.port, ca: ca.cert });
      socket.on("error", () => {});
      try {
        await new Promise<void>((resolve, reject) => socket.once("secureConnect", resolve).once("error", reject));
        return socket.getPeerCertificate().subjectaltname?.includes("renewed.local") ?? false;
      } finally {
        socket.destroy();
      }
    });
    await files.write("policy.json", JSON.stringify(policy));
  });

  it("takes a new policy and a new certificate without a restart, and keeps the old ones when the new are broken", async () => {
    const before = firstCallerOver(server.address, ca.cert, certs.billing);
    expect((await failure(before.call("FetchKeyById", { tenantId: tenant, keyId }))).code).to.equal(
      grpc.status.PERMISSION_DENIED,
    );
    before.close();
    const granted = {
      callers: [...policy.callers.filter((c) => c.identity !== billing), { identity: billing, methods: ["*"] }],
    };
    await files.write("policy.json", JSON.stringify(granted));
    await until(async () => {
      const caller = firstCallerOver(server.address, ca.cert, certs.billing);
      try {
        return (await caller.call("FetchKeyById", { tenantId: tenant, keyId })).key !== undefined;
      } finally {
        caller.close();
      }
    });

    // A broken policy is logged and the one in use stays.
    loggedErrors.length = 0;
    await files.write("policy.json", '{"callers": [{"identity": "x", "methods": ["FreezeEverything"]}]}');
    await until(async () => loggedErrors.length > 0);
    const still = firstCallerOver(server.address, ca.cert, certs.billing);
    expect((await still.call("FetchKeyById", { tenantId: tenant, keyId })).key).to.not.equal(undefined);
    still.close();
    await files.write("policy.json", JSON.stringify(policy));

    // A server certificate from a new CA: new connections see it.
    const newCa = await createTestCa("Rotated CA");
    const rotated = await newCa.issue({ server: true, ips: ["127.0.0.1"] });
    await files.write("server-key.pem", rotated.key);
    await files.write("server.pem", rotated.cert);
    await files.write("client-ca.pem", `${ca.cert}\n${newCa.cert}\n`);
    const console2 = await newCa.issue({ dnsNames: [consoleId] });
    await until(async () => {
      const caller = firstCallerOver(server.address, newCa.cert, console2);
      try {
        return (await caller.call("FetchKeyById", { tenantId: tenant, keyId })).key !== undefined;
      } finally {
        caller.close();
      }
    });
  });
});

describe("TLS without a client CA, and mutual TLS without a policy", () => {
  it("serves every protocol over TLS alone, and lets every verified certificate call everything without a policy", async () => {
    const db = await createTestDatabase();
    const files = await tempFolder();
    const ca = await createTestCa("CA");
    const serverCert = await ca.issue({ server: true, ips: ["127.0.0.1"] });
    const tls = {
      certFile: await files.write("cert.pem", serverCert.cert),
      keyFile: await files.write("key.pem", serverCert.key),
    };
    const tenant = newTenant();
    const keyId = await insertKey(db.sql, { tenantId: tenant, name: "k" });
    const tlsOnly = await startTestService(db.url, { tls: { ...tls, clientCaFile: undefined } });
    const mutual = await startTestService(db.url, {
      tls: { ...tls, clientCaFile: await files.write("ca.pem", ca.cert) },
    });
    try {
      for (const caller of callersOver(tlsOnly.address, ca.cert)) {
        const frozen = await caller.call("UpdateKeyFrozen", { tenantId: tenant, keyId });
        expect((frozen.key as JsonObject).freezeActor ?? "", caller.name).to.equal("");
        await caller.call("UpdateKeyUnfrozen", { tenantId: tenant, keyId });
        caller.close();
      }
      const anyone = await ca.issue({ uris: ["spiffe://platform.internal/anyone"] });
      for (const caller of callersOver(mutual.address, ca.cert, anyone)) {
        expect((await caller.call("UpdateKeyFrozen", { tenantId: tenant, keyId })).changed, caller.name).to.equal(true);
        await caller.call("UpdateKeyUnfrozen", { tenantId: tenant, keyId });
        const stream = caller.open("WatchKeys", { allTenants: true });
        expect((await stream.next())?.marker, caller.name).to.equal("WATCH_MARKER_PROGRESS");
        stream.cancel();
        caller.close();
      }
    } finally {
      await tlsOnly.close(100);
      await mutual.close(100);
      await files.remove();
      await db.drop();
    }
  });
});

describe("the TLS settings", () => {
  it("refuses to start in production without TLS, unless plaintext is asked for by name", () => {
    expect(() => loadConfig({ NODE_ENV: "production" }))
      .to.throw(ConfigError)
      .with.property("message")
      .that.includes("TLS_CERT_FILE")
      .and.includes("ALLOW_PLAINTEXT=true");
    expect(loadConfig({ NODE_ENV: "production", ALLOW_PLAINTEXT: "true" }).tls).to.equal(undefined);
    expect(() => loadConfig({ NODE_ENV: "production", ALLOW_PLAINTEXT: "yes" })).to.throw(/ALLOW_PLAINTEXT/);
    expect(loadConfig({}).tls).to.equal(undefined);
  });

  it("names the variable that is missing or wrong", async () => {
    expect(() => loadConfig({ TLS_CERT_FILE: "/x.pem" })).to.throw(/TLS_KEY_FILE/);
    expect(() => loadConfig({ TLS_CLIENT_CA_FILE: "/ca.pem" })).to.throw(/TLS_CLIENT_CA_FILE needs TLS_CERT_FILE/);
    expect(() => loadConfig({ TLS_CERT_FILE: "/x", TLS_KEY_FILE: "/y", AUTH_POLICY_FILE: "/p.json" })).to.throw(
      /AUTH_POLICY_FILE needs TLS_CLIENT_CA_FILE/,
    );
    const db = await createTestDatabase();
    const files = await tempFolder();
    try {
      const ca = await createTestCa("CA");
      const one = await ca.issue({ server: true, ips: ["127.0.0.1"] });
      const two = await ca.issue({ server: true, ips: ["127.0.0.1"] });
      const cert = await files.write("cert.pem", one.cert);
      const wrongKey = await files.write("key.pem", two.key);
      const start = (settings: Parameters<typeof startTestService>[1]) =>
        startTestService(db.url, settings).then(
          (s) => s.close(100).then(() => undefined),
          (err: Error) => err.message,
        );
      expect(await start({ tls: { certFile: cert, keyFile: wrongKey, clientCaFile: undefined } })).to.match(
        /^TLS_CERT_FILE and TLS_KEY_FILE are not a PEM certificate and its key/,
      );
      expect(
        await start({ tls: { certFile: cert, keyFile: `${files.dir}/none.pem`, clientCaFile: undefined } }),
      ).to.match(/^TLS_KEY_FILE names .*none\.pem, which cannot be read \(ENOENT\)/);
      const key = await files.write("key.pem", one.key);
      const badPolicy = await files.write("policy.json", '{"callers": [{"identity": "a", "methods": ["Freeze"]}]}');
      const caFile = await files.write("ca.pem", ca.cert);
      expect(
        await start({ tls: { certFile: cert, keyFile: key, clientCaFile: caFile }, authPolicyFile: badPolicy }),
      ).to.match(/^AUTH_POLICY_FILE callers\[0\]\.methods names "Freeze", which is not an rpc/);
      expect(await start({ tls: { certFile: cert, keyFile: key, clientCaFile: cert } })).to.equal(undefined);
    } finally {
      await files.remove();
      await db.drop();
    }
  });
});

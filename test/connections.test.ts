import http2 from "node:http2";
import net from "node:net";
import { expect } from "chai";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { startMain, startTestService } from "./support/service.js";

/** A raw TCP connection; resolves `closed` with the milliseconds until the server closed it. */
function rawSocket(address: string, send?: string) {
  const [host, port] = address.split(":") as [string, string];
  const socket = net.connect(Number(port), host);
  const opened = performance.now();
  socket.on("error", () => {});
  socket.on("data", () => {});
  if (send !== undefined) socket.write(send);
  const connected = new Promise<void>((resolve) => socket.once("connect", () => resolve()));
  const closed = new Promise<number>((resolve) => socket.once("close", () => resolve(performance.now() - opened)));
  return { socket, connected, closed };
}

const within = <T>(promise: Promise<T>, ms: number) =>
  Promise.race([promise, new Promise<"still open">((r) => setTimeout(() => r("still open"), ms))]);

describe("connection limits", () => {
  let db: TestDatabase;
  before(async () => {
    db = await createTestDatabase();
  });
  after(async () => {
    await db?.drop();
  });

  it("closes connections past the cap as they arrive, and takes new ones once others leave", async () => {
    const service = await startTestService(db.url, { connectionLimits: { maxConnections: 3 } });
    try {
      const held = [rawSocket(service.address), rawSocket(service.address), rawSocket(service.address)];
      await Promise.all(held.map((h) => h.connected));
      await new Promise((r) => setTimeout(r, 100));
      const extra = rawSocket(service.address);
      expect(await within(extra.closed, 2000)).to.be.a("number");
      for (const h of held) h.socket.destroy();
      await Promise.all(held.map((h) => h.closed));
      await new Promise((r) => setTimeout(r, 100));
      const res = await fetch(`http://${service.address}/livez`);
      expect(res.status).to.equal(200);
    } finally {
      await service.close(1000);
    }
  });

  it("closes an HTTP/2 connection that makes no call for the idle time", async () => {
    const service = await startTestService(db.url, { connectionLimits: { idleTimeoutMs: 1000 } });
    try {
      const session = http2.connect(`http://${service.address}`);
      session.on("error", () => {});
      const goaway = new Promise<number>((resolve) => {
        const opened = performance.now();
        session.once("goaway", () => resolve(performance.now() - opened));
        session.once("close", () => resolve(performance.now() - opened));
      });
      const after = await within(goaway, 5000);
      expect(after).to.be.a("number").within(900, 4000);
      session.destroy();
    } finally {
      await service.close(1000);
    }
  });

  it("closes a connection whose HTTP/1.1 headers never finish, and one that never says its protocol", async function () {
    this.timeout(30_000);
    const service = await startTestService(db.url);
    try {
      const headers = rawSocket(
        service.address,
        "POST /keysdriver.v1.KeysDriverService/CountKeys HTTP/1.1\r\nHost: x\r\n",
      );
      const silent = rawSocket(service.address);
      const halfPreface = rawSocket(service.address, "PRI * HTTP/2.0\r\n");
      const prefaceOnly = rawSocket(service.address, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
      for (const s of [headers, silent, halfPreface, prefaceOnly]) {
        expect(await within(s.closed, 15_000))
          .to.be.a("number")
          .within(9_000, 15_000);
      }
    } finally {
      await service.close(1000);
    }
  });
});

describe("shutdown with idle and half-open connections", () => {
  let db: TestDatabase;
  before(async () => {
    db = await createTestDatabase();
  });
  after(async () => {
    await db?.drop();
  });

  it("finishes within the grace period and exits 0", async function () {
    this.timeout(30_000);
    const { child, exited, listening, output } = startMain({ DATABASE_URL: db.url, SHUTDOWN_GRACE_MS: "3000" });
    const port = await listening;
    const address = `127.0.0.1:${port}`;
    // Idle: a socket that says nothing, half an HTTP/2 preface, half an
    // HTTP/1.1 request, an HTTP/1.1 keep-alive connection after a request,
    // and an HTTP/2 connection with no call.
    const sockets = [
      rawSocket(address),
      rawSocket(address, "PRI * HTTP/2.0\r\n"),
      rawSocket(address, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), // the whole preface, then nothing
      rawSocket(address, "GET /livez HTTP/1.1\r\nHost: x\r\n"),
      rawSocket(address, "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    const session = http2.connect(`http://${address}`);
    session.on("error", () => {});
    await new Promise<void>((resolve) => session.once("connect", () => resolve()));
    await Promise.all(sockets.map((s) => s.connected));
    await new Promise((r) => setTimeout(r, 200));
    const started = performance.now();
    child.kill("SIGTERM");
    const code = await exited;
    const took = performance.now() - started;
    session.destroy();
    for (const s of sockets) s.socket.destroy();
    expect(code, output()).to.equal(0);
    expect(took).to.be.below(3000 + 2000);
  });
});

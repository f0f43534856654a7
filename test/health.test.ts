import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { expect } from "chai";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../gen/grpc/health/v1/health_pb.js";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import type { RunningService } from "../src/service.js";
import type { TestDatabase } from "./support/database.js";
import type { FreezableProxy } from "./support/proxy.js";
import { startTestService, useServiceBehindFreezableProxy } from "./support/service.js";

/** The statuses a Health.Watch stream sends, as they come. */
function watch(address: string, service: string) {
  const client = createClient(Health, createGrpcTransport({ baseUrl: `http://${address}` }));
  const abort = new AbortController();
  const seen: Status[] = [];
  let ended = false;
  const waiters = new Set<() => void>();
  const done = (async () => {
    try {
      for await (const m of client.watch({ service }, { signal: abort.signal })) {
        seen.push(m.status);
        for (const w of waiters) w();
      }
    } catch (err) {
      if (!abort.signal.aborted) throw err;
    } finally {
      ended = true;
      for (const w of waiters) w();
    }
  })();
  return {
    seen,
    get ended() {
      return ended;
    },
    /** Waits until the stream has sent `status` as its latest, for at most `ms`. */
    async until(status: Status, ms = 5000) {
      const deadline = Date.now() + ms;
      while (seen.at(-1) !== status && Date.now() < deadline) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, 100);
          waiters.add(() => {
            clearTimeout(timer);
            resolve();
          });
        });
      }
      expect(seen.at(-1)).to.equal(status);
    },
    cancel: () => abort.abort(),
    done,
  };
}

async function http(address: string, path: string) {
  const res = await fetch(`http://${address}${path}`);
  return { status: res.status, text: (await res.text()).trim() };
}

describe("health", () => {
  const under = useServiceBehindFreezableProxy();
  let db: TestDatabase;
  let proxy: FreezableProxy;
  let service: RunningService;
  before(() => {
    ({ db, proxy, service } = under);
  });

  it("answers Check for the server and for KeysDriverService, and NOT_FOUND for another service", async () => {
    const client = createClient(Health, createGrpcTransport({ baseUrl: `http://${service.address}` }));
    expect((await client.check({ service: "" })).status).to.equal(Status.SERVING);
    expect((await client.check({ service: KeysDriverService.typeName })).status).to.equal(Status.SERVING);
    const err = await client.check({ service: "no.such.Service" }).catch((e: unknown) => e);
    expect(ConnectError.from(err).code).to.equal(Code.NotFound);
    const unknown = watch(service.address, "no.such.Service");
    await unknown.until(Status.SERVICE_UNKNOWN);
    unknown.cancel();
    await unknown.done;
  });

  it("turns NOT_SERVING while the database does not answer, and SERVING when it is back", async function () {
    this.timeout(20_000);
    const whole = watch(service.address, "");
    const ours = watch(service.address, KeysDriverService.typeName);
    await whole.until(Status.SERVING);
    await ours.until(Status.SERVING);
    expect(await http(service.address, "/readyz")).to.deep.equal({ status: 200, text: "ok" });

    proxy.pause(); // as a stopped PostgreSQL: connections open, nothing answered
    await whole.until(Status.NOT_SERVING, 5000);
    await ours.until(Status.NOT_SERVING, 5000);
    const client = createClient(Health, createGrpcTransport({ baseUrl: `http://${service.address}` }));
    expect((await client.check({ service: "" })).status).to.equal(Status.NOT_SERVING);
    expect(await http(service.address, "/readyz")).to.deep.equal({ status: 503, text: "database unreachable" });
    expect(await http(service.address, "/healthz")).to.deep.equal({ status: 503, text: "database unreachable" });
    // Liveness is the process, not its database: restarting it would not help.
    expect(await http(service.address, "/livez")).to.deep.equal({ status: 200, text: "ok" });

    proxy.resume();
    await whole.until(Status.SERVING, 5000);
    await ours.until(Status.SERVING, 5000);
    expect(whole.seen).to.deep.equal([Status.SERVING, Status.NOT_SERVING, Status.SERVING]);
    expect(await http(service.address, "/readyz")).to.deep.equal({ status: 200, text: "ok" });
    whole.cancel();
    ours.cancel();
    await Promise.all([whole.done, ours.done]);
  });

  it("says NOT_SERVING to watchers when draining, ends their streams, and holds up no shutdown", async function () {
    this.timeout(20_000);
    const own = await startTestService(db.url, { pageTokenSecret: new Uint8Array(32) });
    const watcher = watch(own.address, "");
    await watcher.until(Status.SERVING);
    const started = Date.now();
    await own.close(10_000);
    expect(Date.now() - started).to.be.below(5000);
    await watcher.done;
    expect(watcher.ended).to.equal(true);
    expect(watcher.seen).to.deep.equal([Status.SERVING, Status.NOT_SERVING]);
  });
});

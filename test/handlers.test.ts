import { randomUUID } from "node:crypto";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { expect } from "chai";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import type { KeyRow, Store } from "../src/db/store.js";
import type { KeyFeed } from "../src/feed/key-feed.js";
import { observeCalls } from "../src/interceptors.js";
import { createMetrics } from "../src/metrics.js";
import { createPositionTokens } from "../src/rpc/cursors.js";
import { createKeysDriverService, maxPageSize } from "../src/rpc/keys-driver.js";
import { createPageTokenCodec } from "../src/rpc/page-token.js";
import { createTokenSigner } from "../src/rpc/signed-token.js";

// The handlers' own logic, through connect's in-memory transport with a
// store that records what it was asked: no network, no database. The SQL and
// the wire are covered by the suites that call the real server.

const tenantId = randomUUID();

function row(n: number): KeyRow {
  return {
    id: `00000000-0000-4000-8000-${n.toString().padStart(12, "0")}`,
    tenant_id: tenantId,
    name: `key ${n}`,
    key_prefix: "sk_test_0000",
    status: "active",
    is_frozen: false,
    frozen_at_us: null,
    freeze_reason: null,
    freeze_actor: null,
    created_at_us: 1_700_000_000_000_000n - BigInt(n),
    last_used_at_us: null,
    expires_at_us: null,
    total_requests: 0n,
    version: 1n,
  };
}

function unexpected(): never {
  throw new Error("the store was called");
}

/** A store whose every operation fails the test unless `overrides` provides it. */
function fakeStore(overrides: Partial<Store>): Store {
  return {
    fetchKeys: unexpected,
    countKeys: unexpected,
    fetchKeyById: unexpected,
    fetchKeyUsage: unexpected,
    fetchUsageReport: unexpected,
    fetchKeyForUpdate: unexpected,
    updateKeyFrozen: unexpected,
    updateKeyUnfrozen: unexpected,
    feedBounds: unexpected,
    fetchEventsBetween: unexpected,
    fetchKeysAtSnapshot: unexpected,
    listKeyChanges: unexpected,
    ...overrides,
  };
}

/** The handlers over `store`; WatchKeys has no feed here. */
function handlersFor(store: Store) {
  const signer = createTokenSigner(new Uint8Array(32).fill(7));
  const noFeed: KeyFeed = {
    position: 0n,
    subscribers: 0,
    failing: false,
    subscribe: unexpected,
    readNow: unexpected,
    ready: unexpected,
    endSubscriptions: () => {},
    close: async () => {},
  };
  return createKeysDriverService({
    store,
    pageTokens: createPageTokenCodec(signer),
    positions: createPositionTokens(signer),
    feed: noFeed,
    watch: { progressIntervalMs: 1000, maxQueuedChanges: 10, initialStateReaders: 1 },
  });
}

function clientFor(store: Store, logged: unknown[] = []) {
  const impl = handlersFor(store);
  const transport = createRouterTransport(({ service }) => {
    service(
      KeysDriverService,
      observeCalls(KeysDriverService, impl, { logError: (_message, cause) => logged.push(cause) }),
    );
  });
  return createClient(KeysDriverService, transport);
}

async function codeOf(promise: Promise<unknown>): Promise<Code> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, "the call succeeded").to.be.instanceOf(ConnectError);
  return (err as ConnectError).code;
}

describe("handlers (in memory, with a fake store)", () => {
  it("answers INTERNAL for a handler that throws instead of rejecting, and leaves no promise to reject later", async () => {
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown) => unhandled.push(reason);
    process.on("unhandledRejection", onUnhandled);
    try {
      const throwing = () => {
        throw new Error("thrown, not rejected");
      };
      const transport = createRouterTransport(({ service }) => {
        service(KeysDriverService, observeCalls(KeysDriverService, { countKeys: throwing as never }, {}));
      });
      const client = createClient(KeysDriverService, transport);
      expect(await codeOf(client.countKeys({ tenantId }))).to.equal(Code.Internal);
      // connect-es aborts the call's signal once it is answered.
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(unhandled).to.deep.equal([]);
    } finally {
      process.off("unhandledRejection", onUnhandled);
    }
  });

  it("asks for one row more than the page, and offers a next page only when it came", async () => {
    const asked: number[] = [];
    const client = clientFor(
      fakeStore({
        fetchKeys: async (_tenant, options) => {
          asked.push(options.limit);
          return Array.from({ length: Math.min(options.limit, 3) }, (_, i) => row(i));
        },
      }),
    );
    const full = await client.fetchKeys({ tenantId, pageSize: 2 });
    expect(full.keys.map((k) => k.name)).to.deep.equal(["key 0", "key 1"]);
    expect(full.nextPageToken).to.not.equal("");
    const last = await client.fetchKeys({ tenantId, pageSize: 3 });
    expect(last.keys).to.have.length(3);
    expect(last.nextPageToken).to.equal("");
    await client.fetchKeys({ tenantId, pageSize: 1_000_000 });
    expect(asked).to.deep.equal([3, 4, maxPageSize + 1]);
  });

  it("refuses bad input before the store is asked anything", async () => {
    const client = clientFor(fakeStore({}));
    expect(await codeOf(client.fetchKeys({ tenantId: "nope" }))).to.equal(Code.InvalidArgument);
    expect(await codeOf(client.fetchKeys({ tenantId, pageSize: -1 }))).to.equal(Code.InvalidArgument);
    expect(await codeOf(client.fetchKeys({ tenantId, pageToken: "x" }))).to.equal(Code.InvalidArgument);
    expect(await codeOf(client.fetchKeyById({ tenantId, keyId: "" }))).to.equal(Code.InvalidArgument);
    expect(
      await codeOf(
        client.fetchKeyUsage({
          tenantId,
          keyId: randomUUID(),
          since: { seconds: 10n, nanos: 0 },
          until: { seconds: 5n, nanos: 0 },
        }),
      ),
    ).to.equal(Code.InvalidArgument);
    expect(await codeOf(client.updateKeyFrozen({ tenantId, keyId: randomUUID(), etag: "7" }))).to.equal(
      Code.InvalidArgument,
    );
  });

  it("maps the store's outcomes to NOT_FOUND and ABORTED", async () => {
    const client = clientFor(
      fakeStore({
        fetchKeyById: async () => undefined,
        updateKeyFrozen: async () => ({ kind: "not_found" }),
        updateKeyUnfrozen: async () => ({ kind: "stale" }),
      }),
    );
    const keyId = randomUUID();
    expect(await codeOf(client.fetchKeyById({ tenantId, keyId }))).to.equal(Code.NotFound);
    expect(await codeOf(client.updateKeyFrozen({ tenantId, keyId }))).to.equal(Code.NotFound);
    expect(await codeOf(client.updateKeyUnfrozen({ tenantId, keyId }))).to.equal(Code.Aborted);
  });

  it("answers INTERNAL for an unexpected failure, logging the cause and sending none of it", async () => {
    const logged: unknown[] = [];
    const cause = new Error("secret detail: relation api_keys");
    const client = clientFor(
      fakeStore({
        countKeys: async () => {
          throw cause;
        },
      }),
      logged,
    );
    const err = await client.countKeys({ tenantId }).catch((e: unknown) => e as ConnectError);
    expect(err).to.be.instanceOf(ConnectError);
    expect((err as ConnectError).code).to.equal(Code.Internal);
    expect((err as ConnectError).rawMessage).to.equal("internal error");
    expect(logged).to.deep.equal([cause]);
  });

  it("counts every call by method and status where services are registered", async () => {
    const metrics = createMetrics();
    const impl = handlersFor(fakeStore({ countKeys: async () => 3n }));
    const client = createClient(
      KeysDriverService,
      createRouterTransport(({ service }) => {
        service(KeysDriverService, observeCalls(KeysDriverService, impl, { metrics, logError: () => {} }));
      }),
    );
    expect((await client.countKeys({ tenantId })).count).to.equal(3n);
    await client.countKeys({ tenantId: "bad" }).catch(() => undefined);
    expect(await metrics.calls()).to.deep.equal({ "CountKeys OK": 1, "CountKeys INVALID_ARGUMENT": 1 });
  });
});

// Property-based fuzzing of every request message through the real server:
// generated requests of every rpc, sent by a real client, must each be
// answered (no hang) with success or a status that names the caller's
// mistake, never INTERNAL or UNKNOWN, and the server must stay healthy.
// FUZZ_RUNS sets how many requests per rpc (default 1,000).
import { create, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { expect } from "chai";
import fc from "fast-check";
import { Health, HealthCheckResponse_ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import {
  CountKeysRequestSchema,
  FetchKeyByIdRequestSchema,
  FetchKeysRequestSchema,
  FetchKeyUsageRequestSchema,
  FetchUsageReportRequestSchema,
  KeysDriverService,
  ListKeyChangesRequestSchema,
  UpdateKeyFrozenRequestSchema,
  WatchKeysRequestSchema,
} from "../gen/keysdriver/v1/keys_driver_pb.js";
import { formatEtag } from "../src/rpc/etag.js";
import { insertCalls, insertKey, newTenant } from "./support/fixtures.js";
import { recordObservation } from "./support/record.js";
import { useTestService } from "./support/service.js";

const runs = Number(process.env.FUZZ_RUNS ?? 1000);

/** Statuses that say what was wrong with a request, or with its timing. */
const callerStatuses = new Set([
  Code.InvalidArgument,
  Code.NotFound,
  Code.Aborted,
  Code.OutOfRange,
  Code.FailedPrecondition,
]);

describe("fuzzing every rpc with generated requests", function () {
  this.timeout(20 * 60_000);
  // Progress messages often, so that a valid watch answers at once.
  const service = useTestService({ watchProgressIntervalMs: 100 });
  let ids: { tenants: string[]; keys: string[] };

  before(async () => {
    const tenants = [newTenant(), newTenant()];
    const keys: string[] = [];
    for (const tenantId of tenants) {
      for (let i = 0; i < 3; i++) {
        const keyId = await insertKey(service.db.sql, { tenantId });
        keys.push(keyId);
        await insertCalls(service.db.sql, tenantId, keyId, [
          { costCents: "1.25", at: "2026-05-01 10:00:00+00" },
          { costCents: "99999999999999.999999", at: "2026-05-02 00:00:00+00" },
        ]);
      }
    }
    ids = { tenants, keys };
  });

  // Ids: the suite's own (so that requests reach the database), other UUIDs
  // in any case, and strings of every kind.
  const uuid = () =>
    fc.oneof(
      fc.constantFrom(...ids.tenants, ...ids.keys),
      fc.uuid().map((u) => (Math.random() < 0.5 ? u.toUpperCase() : u)),
      fc.constantFrom("", " ", "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-fffffffffffff"),
      fc.string({ unit: "binary", maxLength: 60 }),
    );
  // Any Timestamp the wire can carry, the valid range's edges and beyond.
  const timestamp = (): fc.Arbitrary<Timestamp | undefined> =>
    fc.option(
      fc.record({
        $typeName: fc.constant("google.protobuf.Timestamp" as const),
        seconds: fc.oneof(
          fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }),
          fc.constantFrom(-62_135_596_800n, -62_135_596_801n, 253_402_300_799n, 253_402_300_800n, 0n),
          fc.bigInt({ min: 1_700_000_000n, max: 1_800_000_000n }),
        ),
        nanos: fc.oneof(fc.integer(), fc.integer({ min: 0, max: 999_999_999 })),
      }),
      { freq: 3, nil: undefined },
    );
  const int32 = () => fc.oneof(fc.integer(), fc.integer({ min: -2, max: 1100 }));
  const text = () =>
    fc.oneof(
      fc.string({ unit: "binary", maxLength: 40 }),
      fc.string({ unit: "grapheme", maxLength: 1100 }),
      fc.constantFrom("", "\u0000", "\u{1F511}".repeat(1025)),
    );
  // Tokens and cursors: random, base64url-shaped, and huge.
  const token = () =>
    fc.oneof(
      fc.constant(""),
      fc.string({ unit: "binary", maxLength: 80 }),
      fc.base64String({ maxLength: 200 }).map((s) => s.replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "")),
      fc.constant("A".repeat(100_000)),
    );
  const etag = () =>
    fc.oneof(
      fc.constant(""),
      fc.string({ maxLength: 30 }),
      fc
        .tuple(fc.bigInt({ min: 0n, max: 10n ** 20n }), fc.stringMatching(/^[0-9a-z]{7}$/))
        .map(([v, t]) => `${v}.${t}`),
    );
  const list = <T>(item: fc.Arbitrary<T>) => fc.array(item, { maxLength: 20 });

  // One client (one HTTP/2 connection) for every call, as a caller would.
  let keysDriver: ReturnType<typeof createClient<typeof KeysDriverService>> | undefined;
  function client() {
    keysDriver ??= createClient(
      KeysDriverService,
      createGrpcTransport({ baseUrl: `http://${service.server.address}` }),
    );
    return keysDriver;
  }

  /** Sends every generated request; collects the ones answered with a status no caller's mistake explains. */
  async function fuzz<D extends DescMessage>(
    schema: D,
    requests: fc.Arbitrary<MessageInitShape<D>>,
    call: (request: MessageShape<D>, signal: AbortSignal) => Promise<unknown>,
  ) {
    const wrong: string[] = [];
    const statuses: Record<string, number> = {};
    const seed = Number(process.env.FUZZ_SEED ?? Date.now() % 1_000_000);
    const started = performance.now();
    let slowestMs = 0;
    await fc.assert(
      fc.asyncProperty(requests, async (init) => {
        const request = create(schema, init);
        const began = performance.now();
        try {
          await call(request, AbortSignal.timeout(20_000));
          statuses.OK = (statuses.OK ?? 0) + 1;
        } catch (err) {
          const code = ConnectError.from(err).code;
          statuses[Code[code]] = (statuses[Code[code]] ?? 0) + 1;
          if (!callerStatuses.has(code)) {
            wrong.push(`${Code[code]}: ${ConnectError.from(err).rawMessage} for ${shown(request)}`);
          }
        } finally {
          slowestMs = Math.max(slowestMs, performance.now() - began);
        }
      }),
      { numRuns: runs, seed },
    );
    const health = createClient(Health, createGrpcTransport({ baseUrl: `http://${service.server.address}` }));
    const healthy = (await health.check({})).status === HealthCheckResponse_ServingStatus.SERVING;
    recordObservation({
      suite: "fuzz",
      request: schema.typeName,
      seed,
      statuses,
      wrong: wrong.slice(0, 5),
      healthy,
      seconds: (performance.now() - started) / 1000,
      slowestMs,
    });
    expect(wrong, wrong.slice(0, 5).join("\n")).to.deep.equal([]);
    expect(healthy).to.equal(true);
  }

  function shown(request: object): string {
    return JSON.stringify(request, (_k, v) => (typeof v === "bigint" ? String(v) : v)).slice(0, 300);
  }

  it("FetchKeys", async () => {
    await fuzz(
      FetchKeysRequestSchema,
      fc.record({ tenantId: uuid(), pageSize: int32(), pageToken: token(), skip: int32() }),
      (r, signal) => client().fetchKeys(r, { signal }),
    );
  });

  it("CountKeys", async () => {
    await fuzz(CountKeysRequestSchema, fc.record({ tenantId: uuid() }), (r, signal) =>
      client().countKeys(r, { signal }),
    );
  });

  it("FetchKeyById and FetchKeyForUpdate", async () => {
    await fuzz(FetchKeyByIdRequestSchema, fc.record({ tenantId: uuid(), keyId: uuid() }), async (r, signal) => {
      await client().fetchKeyById(r, { signal });
      await client().fetchKeyForUpdate({ tenantId: r.tenantId, keyId: r.keyId }, { signal });
    });
  });

  it("FetchKeyUsage", async () => {
    await fuzz(
      FetchKeyUsageRequestSchema,
      fc.record({ tenantId: uuid(), keyId: uuid(), since: timestamp(), until: timestamp() }),
      (r, signal) => client().fetchKeyUsage(r, { signal }),
    );
  });

  it("UpdateKeyFrozen and UpdateKeyUnfrozen", async () => {
    await fuzz(
      UpdateKeyFrozenRequestSchema,
      fc
        .record({ tenantId: uuid(), keyId: uuid(), frozenAt: timestamp(), reason: text(), actor: text() })
        // Etags of every shape, and well formed for the key with any version.
        .chain((r) =>
          fc
            .oneof(
              etag(),
              fc
                .oneof(
                  fc.bigInt({ min: 0n, max: 10n ** 19n - 1n }),
                  fc.constantFrom(2n ** 63n - 1n, 2n ** 63n, 10n ** 19n - 1n),
                )
                .map((v) => formatEtag(r.keyId, v)),
            )
            .map((e) => ({ ...r, etag: e })),
        ),
      async (r, signal) => {
        await client().updateKeyFrozen(r, { signal });
        await client().updateKeyUnfrozen(
          { tenantId: r.tenantId, keyId: r.keyId, etag: r.etag, reason: r.reason, actor: r.actor },
          { signal },
        );
      },
    );
  });

  it("ListKeyChanges", async () => {
    await fuzz(
      ListKeyChangesRequestSchema,
      fc.record({ tenantId: uuid(), keyId: fc.oneof(fc.constant(""), uuid()), pageSize: int32(), pageToken: token() }),
      (r, signal) => client().listKeyChanges(r, { signal }),
    );
  });

  it("FetchUsageReport", async () => {
    await fuzz(
      FetchUsageReportRequestSchema,
      fc.record({
        tenantId: uuid(),
        keyIds: list(uuid()),
        since: timestamp(),
        until: timestamp(),
        bucketWidth: fc.integer({ min: -1, max: 4 }),
        groupBy: list(fc.integer({ min: -1, max: 3 })),
        orderBy: fc.integer({ min: -1, max: 3 }),
        pageSize: int32(),
        pageToken: token(),
      }),
      (r, signal) => client().fetchUsageReport(r, { signal }),
    );
  });

  it("WatchKeys (until its first message)", async () => {
    await fuzz(
      WatchKeysRequestSchema,
      fc.record({
        tenantId: fc.oneof(fc.constant(""), uuid()),
        keyIds: list(uuid()),
        resumeCursor: token(),
        allTenants: fc.boolean(),
        sendInitialState: fc.boolean(),
      }),
      async (r, signal) => {
        // A valid watch streams for ever: its first message is enough.
        const stop = new AbortController();
        signal.addEventListener("abort", () => stop.abort(signal.reason), { once: true });
        try {
          for await (const _ of client().watchKeys(r, { signal: stop.signal })) break;
        } finally {
          stop.abort();
        }
      },
    );
  });
});

import { randomUUID } from "node:crypto";
import type { JsonObject } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { expect } from "chai";
import type { TransactionSql } from "postgres";
import { createSql, type Sql } from "../src/db/client.js";
import { pruneKeyEvents } from "../src/jobs/prune-key-events.js";
import type { RunningService } from "../src/service.js";
import {
  connectGrpcCaller,
  connectHttp2Caller,
  connectProtocolCaller,
  failure,
  grpcJsCaller,
  grpcWebCaller,
  grpcWebHttp2Caller,
  type JsonCaller,
  type OpenStream,
  RpcError,
} from "./support/clients.js";
import { createTestDatabase, type TestDatabase } from "./support/database.js";
import { insertKey, insertKeysAt, newTenant } from "./support/fixtures.js";
import { startTestService } from "./support/service.js";

// WatchKeys and ListKeyChanges against the real service and PostgreSQL,
// through both gRPC clients (and Connect and gRPC-Web for streaming).

/** The next `count` changes of a stream, skipping progress markers; fails after `waitMs` of silence. */
async function changes(stream: OpenStream, count: number, waitMs = 10_000): Promise<JsonObject[]> {
  const out: JsonObject[] = [];
  while (out.length < count) {
    const message = await stream.next(waitMs);
    if (message === undefined) throw new Error(`the stream ended after ${out.length} of ${count} changes`);
    if (message.change) out.push(message.change as JsonObject);
  }
  return out;
}

/** Asserts the stream sends no change within `ms` (progress markers allowed). */
async function quiet(stream: OpenStream, ms: number): Promise<void> {
  const until = Date.now() + ms;
  for (;;) {
    const left = until - Date.now();
    if (left <= 0) return;
    const message = await stream.next(left).catch((err: Error) => {
      if (/no message within/.test(err.message)) return undefined;
      throw err;
    });
    if (message === undefined) return;
    expect(message.change, "an unexpected change").to.equal(undefined);
  }
}

/** Reads `stream` to its end: rejects with the status it ended with. */
async function drained(stream: OpenStream): Promise<void> {
  for (;;) if ((await stream.next()) === undefined) return;
}

/** The key a change carries. */
function keyOf(change: JsonObject | undefined): JsonObject {
  expect(change, "no change").to.be.an("object");
  return (change as JsonObject).key as JsonObject;
}

type Db = Sql | TransactionSql<{ bigint: bigint }>;

const freeze = (sql: Db, tenantId: string, keyId: string) =>
  sql`update api_keys set is_frozen = true, frozen_at = now(), freeze_reason = 'r', freeze_actor = 'a' where tenant_id = ${tenantId} and id = ${keyId}`;
const rename = (sql: Db, tenantId: string, keyId: string, name: string) =>
  sql`update api_keys set name = ${name} where tenant_id = ${tenantId} and id = ${keyId}`;

/** The service's own pool connections in pg_stat_activity. */
async function serviceConnections(db: TestDatabase): Promise<number> {
  const [row]: [{ n: bigint }?] = await db.sql`
    select count(*) as n from pg_stat_activity
    where datname = current_database() and application_name = 'keys-driver-service' and pid <> pg_backend_pid()
  `;
  return Number(row?.n ?? 0n);
}

describe("WatchKeys and ListKeyChanges", () => {
  let db: TestDatabase;
  let service: RunningService;
  let writer: Sql;

  before(async () => {
    db = await createTestDatabase();
    service = await startTestService(db.url, { watchProgressIntervalMs: 300 });
    // A writer other than this service, like a console or an operator's SQL.
    writer = createSql({ url: db.url, poolMax: 10, statementTimeoutMs: 30_000, applicationName: "console" });
  });
  after(async () => {
    await writer?.end();
    await service?.close(1000);
    await db?.drop();
  });

  for (const makeCaller of [connectGrpcCaller, grpcJsCaller]) {
    describe(`through ${makeCaller === grpcJsCaller ? "@grpc/grpc-js" : "connect-node"}`, () => {
      let client: JsonCaller;
      before(() => {
        client = makeCaller(service.address);
      });
      after(() => client.close());

      it("delivers a freeze, an unfreeze and an edit by SQL, with the key after each and who made it", async () => {
        const tenantId = newTenant();
        const keyId = await insertKey(db.sql, { tenantId, name: "before" });
        const stream = client.open("WatchKeys", { tenantId });
        await stream.next(); // the first progress marker: subscribed
        await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "leaked", actor: "alice" });
        await client.call("UpdateKeyUnfrozen", { tenantId, keyId, reason: "rotated", actor: "bob" });
        await writer.begin(async (tx) => {
          await tx`select set_config('keys.change_actor', 'console:carol', true)`;
          await rename(tx, tenantId, keyId, "after");
        });
        const [frozen, unfrozen, renamed] = await changes(stream, 3);
        expect(frozen).to.include({ kind: "KEY_CHANGE_KIND_FROZEN", reason: "leaked", actor: "alice" });
        expect(frozen?.key).to.include({ id: keyId, isFrozen: true, freezeReason: "leaked", freezeActor: "alice" });
        expect(unfrozen).to.include({ kind: "KEY_CHANGE_KIND_UNFROZEN", reason: "rotated", actor: "bob" });
        expect(unfrozen?.key).to.not.have.property("isFrozen");
        expect(unfrozen?.key).to.not.have.property("freezeReason");
        expect(renamed).to.include({ kind: "KEY_CHANGE_KIND_UPDATED", actor: "console:carol", dbRole: "postgres" });
        expect(keyOf(renamed).name).to.equal("after");
        expect(renamed?.application).to.equal("console");
        for (const c of [frozen, unfrozen, renamed]) expect(c?.changedAt).to.be.a("string");
        stream.cancel();
      });

      it("reports keys created and deleted", async () => {
        const tenantId = newTenant();
        const stream = client.open("WatchKeys", { tenantId });
        await stream.next();
        const keyId = await insertKey(db.sql, { tenantId, name: "new" });
        await db.sql`delete from api_keys where tenant_id = ${tenantId} and id = ${keyId}`;
        const [created, deleted] = await changes(stream, 2);
        expect(created).to.include({ kind: "KEY_CHANGE_KIND_CREATED" });
        expect(deleted).to.include({ kind: "KEY_CHANGE_KIND_DELETED" });
        expect(keyOf(deleted).name).to.equal("new");
        stream.cancel();
      });

      it("never shows a tenant another tenant's changes, nor only some keys' stream the others", async () => {
        const tenantId = newTenant();
        const other = newTenant();
        const mine = await insertKey(db.sql, { tenantId });
        const alsoMine = await insertKey(db.sql, { tenantId });
        const theirs = await insertKey(db.sql, { tenantId: other });
        const all = client.open("WatchKeys", { tenantId });
        const one = client.open("WatchKeys", { tenantId, keyIds: [alsoMine] });
        await all.next();
        await one.next();
        await freeze(writer, other, theirs);
        await freeze(writer, tenantId, mine);
        await freeze(writer, tenantId, alsoMine);
        expect((await changes(all, 2)).map((c) => (c.key as JsonObject).id)).to.deep.equal([mine, alsoMine]);
        expect((await changes(one, 1)).map((c) => (c.key as JsonObject).id)).to.deep.equal([alsoMine]);
        await quiet(all, 300);
        all.cancel();
        one.cancel();
      });

      it("resumes from every cursor with exactly the changes after it, in order", async () => {
        const tenantId = newTenant();
        const keyId = await insertKey(db.sql, { tenantId });
        const stream = client.open("WatchKeys", { tenantId });
        const start = (await stream.next()) as JsonObject;
        for (let i = 0; i < 6; i++) await rename(writer, tenantId, keyId, `name ${i}`);
        const seen = await changes(stream, 6);
        stream.cancel();
        const cursors = [start.cursor as string, ...seen.map((c) => c.cursor as string)];
        for (const [i, cursor] of cursors.entries()) {
          const resumed = client.open("WatchKeys", { tenantId, resumeCursor: cursor });
          const expected = seen.slice(i).map((c) => (c.key as JsonObject).name);
          const got = await changes(resumed, expected.length);
          expect(got.map((c) => (c.key as JsonObject).name)).to.deep.equal(expected);
          await quiet(resumed, 200);
          resumed.cancel();
        }
      });

      it("sends the initial state, then SYNCED, then changes, with nothing missed or repeated while writers run", async function () {
        this.timeout(60_000);
        const tenantId = newTenant();
        const keys = await Promise.all(Array.from({ length: 30 }, () => insertKey(db.sql, { tenantId, name: "0" })));
        let running = true;
        let writes = 0;
        const writers = Array.from({ length: 4 }, async (_, w) => {
          while (running) {
            const keyId = keys[(writes++ * 7 + w) % keys.length] as string;
            await rename(writer, tenantId, keyId, String(writes));
          }
        });
        await new Promise((r) => setTimeout(r, 100));
        const stream = client.open("WatchKeys", { tenantId, sendInitialState: true });
        const state = new Map<string, string>();
        for (;;) {
          const message = (await stream.next()) as JsonObject;
          if (message.marker === "WATCH_MARKER_SYNCED") break;
          const key = message.current as JsonObject;
          state.set(key.id as string, key.name as string);
        }
        expect(state.size).to.equal(30);
        await new Promise((r) => setTimeout(r, 300));
        running = false;
        await Promise.all(writers);
        const finalRows: { id: string; name: string; version: bigint }[] = await db.sql`
          select id, name, version from api_keys where tenant_id = ${tenantId}
        `;
        const versions = new Map<string, bigint>();
        // Apply changes until every key is at its final version: each change
        // must move its key's version by exactly one (nothing missed or repeated).
        const unsettled = () => finalRows.some((r) => state.get(r.id) !== r.name || versions.get(r.id) !== r.version);
        while (unsettled()) {
          const [c] = await changes(stream, 1);
          const key = c?.key as JsonObject;
          const version = BigInt((key.etag as string).split(".")[0] as string);
          const before = versions.get(key.id as string);
          if (before !== undefined) expect(version, `key ${key.id}`).to.equal(before + 1n);
          versions.set(key.id as string, version);
          state.set(key.id as string, key.name as string);
        }
        await quiet(stream, 300);
        stream.cancel();
      });

      it("ends a slow reader's stream with RESOURCE_EXHAUSTED, and it resumes from its last cursor", async function () {
        this.timeout(60_000);
        // A service whose streams may fall 20 changes behind.
        const strict = await startTestService(db.url, { watchMaxQueuedChanges: 20, watchProgressIntervalMs: 300 });
        const slowClient = makeCaller(strict.address);
        try {
          const tenantId = newTenant();
          const keyId = await insertKey(db.sql, { tenantId });
          const stream = slowClient.open("WatchKeys", { tenantId });
          const first = (await stream.next()) as JsonObject;
          // Far more than the stream's queue plus what HTTP/2 flow control lets through unread.
          const total = 3000;
          for (let i = 0; i < total; i += 100) {
            await writer.begin(async (tx) => {
              for (let j = 0; j < 100; j++) await rename(tx, tenantId, keyId, `n${i + j}`);
            });
          }
          let last = first.cursor as string;
          let received = 0;
          const ended = await (async () => {
            for (;;) {
              const message = await stream.next();
              if (message === undefined) return undefined;
              last = message.cursor as string;
              if (message.change) received++;
            }
          })().catch((err: unknown) => err);
          expect(ended).to.be.instanceOf(RpcError);
          expect((ended as RpcError).code).to.equal(Code.ResourceExhausted);
          expect((ended as RpcError).rawMessage).to.contain("resume from the last cursor");
          expect(received).to.be.below(total);
          const resumed = client.open("WatchKeys", { tenantId, resumeCursor: last });
          const rest = await changes(resumed, total - received);
          expect(keyOf(rest.at(-1)).name).to.equal(`n${total - 1}`);
          await quiet(resumed, 200);
          resumed.cancel();
        } finally {
          slowClient.close();
          await strict.close(1000);
        }
      });

      it("refuses a forged cursor, another tenant's cursor, and an implicit all-tenants watch", async () => {
        const tenantId = newTenant();
        const stream = client.open("WatchKeys", { tenantId });
        const cursor = ((await stream.next()) as JsonObject).cursor as string;
        stream.cancel();
        const expectRefused = async (request: JsonObject, field: string) => {
          const s = client.open("WatchKeys", request);
          const err = await failure(s.next());
          expect(err.code, err.rawMessage).to.equal(Code.InvalidArgument);
          expect(err.rawMessage).to.contain(field);
        };
        await expectRefused({ tenantId: newTenant(), resumeCursor: cursor }, "resume_cursor");
        await expectRefused({ allTenants: true, resumeCursor: cursor }, "resume_cursor");
        // Edited: its last two characters changed (to "AA", or "BB" when they were "AA").
        const edited = `${cursor.slice(0, -2)}${cursor.endsWith("AA") ? "BB" : "AA"}`;
        await expectRefused({ tenantId, resumeCursor: edited }, "resume_cursor");
        await expectRefused({ tenantId, resumeCursor: "garbage!" }, "resume_cursor");
        await expectRefused({}, "tenant_id");
        await expectRefused({ tenantId, allTenants: true }, "tenant_id");
        await expectRefused({ allTenants: true, keyIds: [randomUUID()] }, "key_ids");
        await expectRefused({ tenantId, keyIds: ["nope"] }, "key_ids[0]");
        await expectRefused({ tenantId, resumeCursor: cursor, sendInitialState: true }, "send_initial_state");
      });

      it("answers OUT_OF_RANGE for a cursor older than the retained history", async () => {
        const tenantId = newTenant();
        const keyId = await insertKey(db.sql, { tenantId });
        const stream = client.open("WatchKeys", { tenantId });
        const cursor = ((await stream.next()) as JsonObject).cursor as string;
        stream.cancel();
        await rename(writer, tenantId, keyId, "x");
        // Everything is old enough when the retention is 0 days.
        await db.sql`update key_events set changed_at = changed_at - interval '2 days'`;
        expect(await pruneKeyEvents(db.sql, 1)).to.be.at.least(1);
        const err = await failure(client.open("WatchKeys", { tenantId, resumeCursor: cursor }).next());
        expect(err.code).to.equal(Code.OutOfRange);
        expect(err.rawMessage).to.contain("list the keys again");
      });

      it("watches every tenant when asked explicitly", async () => {
        const a = newTenant();
        const b = newTenant();
        const ka = await insertKey(db.sql, { tenantId: a });
        const kb = await insertKey(db.sql, { tenantId: b });
        const stream = client.open("WatchKeys", { allTenants: true });
        await stream.next();
        await freeze(writer, a, ka);
        await freeze(writer, b, kb);
        const seen = await changes(stream, 2);
        expect(seen.map((c) => (c.key as JsonObject).tenantId)).to.deep.equal([a, b]);
        stream.cancel();
      });

      it("lists a key's changes newest first, page by page, for its tenant only", async () => {
        const tenantId = newTenant();
        const keyId = await insertKey(db.sql, { tenantId });
        const other = await insertKey(db.sql, { tenantId });
        await client.call("UpdateKeyFrozen", { tenantId, keyId, reason: "leaked", actor: "alice" });
        await client.call("UpdateKeyUnfrozen", { tenantId, keyId, actor: "bob" });
        await rename(writer, tenantId, other, "other");
        const first = await client.call("ListKeyChanges", { tenantId, keyId, pageSize: 2 });
        const firstChanges = first.changes as JsonObject[];
        expect(firstChanges.map((c) => c.kind)).to.deep.equal(["KEY_CHANGE_KIND_UNFROZEN", "KEY_CHANGE_KIND_FROZEN"]);
        expect(firstChanges[1]).to.include({ reason: "leaked", actor: "alice" });
        const second = await client.call("ListKeyChanges", {
          tenantId,
          keyId,
          pageSize: 2,
          pageToken: first.nextPageToken as string,
        });
        expect((second.changes as JsonObject[]).map((c) => c.kind)).to.deep.equal(["KEY_CHANGE_KIND_CREATED"]);
        expect(second.nextPageToken).to.equal(undefined);
        const whole = await client.call("ListKeyChanges", { tenantId });
        expect(whole.changes as JsonObject[]).to.have.length(5);
        // Another tenant's key is NOT_FOUND, as in every rpc.
        const theirs = await failure(client.call("ListKeyChanges", { tenantId: newTenant(), keyId }));
        expect(theirs.code).to.equal(Code.NotFound);
        const err = await failure(
          client.call("ListKeyChanges", { tenantId: newTenant(), keyId, pageToken: first.nextPageToken as string }),
        );
        expect(err.code).to.equal(Code.InvalidArgument);
        expect(err.rawMessage).to.contain("page_token");
      });
    });
  }

  describe("the feed's guarantees", () => {
    let client: JsonCaller;
    before(() => {
      client = grpcJsCaller(service.address);
    });
    after(() => client.close());

    it("does not skip a change whose transaction committed after a later one's", async () => {
      const tenantId = newTenant();
      const early = await insertKey(db.sql, { tenantId });
      const late = await insertKey(db.sql, { tenantId });
      const stream = client.open("WatchKeys", { tenantId });
      const start = ((await stream.next()) as JsonObject).cursor as string;
      // The first transaction changes its key first and commits last.
      const slow = await writer.reserve();
      try {
        await slow`begin`;
        await rename(slow, tenantId, early, "changed first, committed last");
        await rename(writer, tenantId, late, "changed second, committed first");
        const [first] = await changes(stream, 1);
        expect(keyOf(first).id).to.equal(late);
        await slow`commit`;
      } finally {
        slow.release();
      }
      const [second] = await changes(stream, 1);
      expect(keyOf(second).id).to.equal(early);
      stream.cancel();
      // A reader that resumes from before both sees both, in commit order.
      const resumed = client.open("WatchKeys", { tenantId, resumeCursor: start });
      expect((await changes(resumed, 2)).map((c) => (c.key as JsonObject).id)).to.deep.equal([late, early]);
      resumed.cancel();
    });

    it("waits for a position taken before commit, skipping nothing, and holds back no freeze meanwhile", async () => {
      const tenantId = newTenant();
      const held = await insertKey(db.sql, { tenantId });
      const frozen = await insertKey(db.sql, { tenantId });
      const stream = client.open("WatchKeys", { tenantId });
      const start = ((await stream.next()) as JsonObject).cursor as string;
      // SET CONSTRAINTS ... IMMEDIATE fires the event trigger at once: the
      // transaction takes its position now and holds it until it ends.
      const slow = await writer.reserve();
      try {
        await slow`begin`;
        await slow`set constraints all immediate`;
        await rename(slow, tenantId, held, "position taken, not yet committed");
        // The kill switch keeps working while the feed waits for that position.
        for (let i = 0; i < 6; i++) {
          await client.call(i % 2 === 0 ? "UpdateKeyFrozen" : "UpdateKeyUnfrozen", { tenantId, keyId: frozen });
        }
        // A snapshot cannot be taken while a position is held: retry later.
        const initial = client.open("WatchKeys", { tenantId, sendInitialState: true });
        expect((await failure(initial.next())).code).to.equal(Code.Unavailable);
        // The later changes wait for the held one, which may still commit.
        await quiet(stream, 500);
        await slow`commit`;
      } finally {
        slow.release();
      }
      const expected = [held, frozen, frozen, frozen, frozen, frozen, frozen];
      expect((await changes(stream, 7)).map((c) => keyOf(c).id)).to.deep.equal(expected);
      stream.cancel();
      const resumed = client.open("WatchKeys", { tenantId, resumeCursor: start });
      expect((await changes(resumed, 7)).map((c) => keyOf(c).id)).to.deep.equal(expected);
      resumed.cancel();
    });

    it("passes over a position whose transaction rolled back, losing none of the changes after it", async () => {
      const tenantId = newTenant();
      const abandoned = await insertKey(db.sql, { tenantId });
      const frozen = await insertKey(db.sql, { tenantId });
      const stream = client.open("WatchKeys", { tenantId });
      const start = ((await stream.next()) as JsonObject).cursor as string;
      const slow = await writer.reserve();
      try {
        await slow`begin`;
        await slow`set constraints all immediate`;
        await rename(slow, tenantId, abandoned, "position taken, then rolled back");
        for (let i = 0; i < 4; i++) {
          await client.call(i % 2 === 0 ? "UpdateKeyFrozen" : "UpdateKeyUnfrozen", { tenantId, keyId: frozen });
        }
        await quiet(stream, 300);
        await slow`rollback`;
      } finally {
        slow.release();
      }
      const expected = [frozen, frozen, frozen, frozen];
      expect((await changes(stream, 4)).map((c) => keyOf(c).id)).to.deep.equal(expected);
      await quiet(stream, 300);
      stream.cancel();
      const resumed = client.open("WatchKeys", { tenantId, resumeCursor: start });
      expect((await changes(resumed, 4)).map((c) => keyOf(c).id)).to.deep.equal(expected);
      resumed.cancel();
    });

    it("is not held back by a long transaction that writes no key, when a position goes missing", async () => {
      const tenantId = newTenant();
      const frozen = await insertKey(db.sql, { tenantId });
      const stream = client.open("WatchKeys", { tenantId });
      await stream.next();
      const unrelated = await writer.reserve();
      try {
        await unrelated`begin`;
        await unrelated`select pg_current_xact_id()`; // a transaction id, held open
        // A position taken and never used (as by a failed commit).
        await writer`select nextval('key_events_position')`;
        await client.call("UpdateKeyFrozen", { tenantId, keyId: frozen });
        const [change] = await changes(stream, 1, 2000);
        expect(keyOf(change).id).to.equal(frozen);
      } finally {
        await unrelated`rollback`;
        unrelated.release();
      }
      stream.cancel();
    });

    it("lists in ListKeyChanges only what a stream resuming from its cursor cannot skip", async () => {
      const tenantId = newTenant();
      const held = await insertKey(db.sql, { tenantId });
      const later = await insertKey(db.sql, { tenantId });
      const slow = await writer.reserve();
      let newest: JsonObject | undefined;
      try {
        await slow`begin`;
        await slow`set constraints all immediate`;
        await rename(slow, tenantId, held, "taken first, committed last");
        await rename(writer, tenantId, later, "committed first");
        // The later change waits behind the held position: listing it now
        // would hand out a cursor past a change still to come.
        const listed = await client.call("ListKeyChanges", { tenantId });
        newest = (listed.changes as JsonObject[])[0];
        expect(keyOf(newest).name).to.not.equal("committed first");
        await slow`commit`;
      } finally {
        slow.release();
      }
      const resumed = client.open("WatchKeys", { tenantId, resumeCursor: newest?.cursor as string });
      const names = (await changes(resumed, 2)).map((c) => keyOf(c).name);
      expect(names).to.deep.equal(["taken first, committed last", "committed first"]);
      resumed.cancel();
    });

    it("records a key moved to another tenant as deleted there and created here, and a TRUNCATE as deletions", async () => {
      const from = newTenant();
      const to = newTenant();
      const keyId = await insertKey(db.sql, { tenantId: from });
      const watchFrom = client.open("WatchKeys", { tenantId: from });
      const watchTo = client.open("WatchKeys", { tenantId: to });
      await watchFrom.next();
      await watchTo.next();
      await writer`update api_keys set tenant_id = ${to} where tenant_id = ${from} and id = ${keyId}`;
      const [gone] = await changes(watchFrom, 1);
      expect(gone?.kind).to.equal("KEY_CHANGE_KIND_DELETED");
      expect(keyOf(gone).tenantId).to.equal(from);
      const [appeared] = await changes(watchTo, 1);
      expect(appeared?.kind).to.equal("KEY_CHANGE_KIND_CREATED");
      expect(keyOf(appeared).tenantId).to.equal(to);
      watchFrom.cancel();
      watchTo.cancel();

      // TRUNCATE, on a database of its own (it empties the whole table).
      const own = await createTestDatabase();
      const other = await startTestService(own.url, { watchProgressIntervalMs: 300 });
      const ownClient = grpcJsCaller(other.address);
      try {
        const tenantId = newTenant();
        const keys = [await insertKey(own.sql, { tenantId }), await insertKey(own.sql, { tenantId })];
        const stream = ownClient.open("WatchKeys", { tenantId });
        await stream.next();
        await own.sql`truncate api_keys cascade`;
        const deleted = await changes(stream, 2);
        expect(deleted.map((c) => c.kind)).to.deep.equal(["KEY_CHANGE_KIND_DELETED", "KEY_CHANGE_KIND_DELETED"]);
        expect(deleted.map((c) => keyOf(c).id).sort()).to.deep.equal([...keys].sort());
        stream.cancel();
      } finally {
        ownClient.close();
        await other.close(1000);
        await own.drop();
      }
    });

    it("carries a key whose instants a Timestamp cannot hold, without failing the feed for anyone", async () => {
      const odd = newTenant();
      const tenantId = newTenant();
      const keyId = await insertKey(db.sql, { tenantId });
      const everyone = client.open("WatchKeys", { allTenants: true });
      const stream = client.open("WatchKeys", { tenantId });
      await everyone.next();
      await stream.next();
      // Written by someone else's SQL: infinity, -infinity, and a year after 9999.
      const oddKey = await insertKey(db.sql, { tenantId: odd, expiresAt: "infinity", lastUsedAt: "-infinity" });
      await db.sql`update api_keys set frozen_at = '12000-01-01', is_frozen = true where id = ${oddKey}`;
      await rename(writer, tenantId, keyId, "after the odd key");
      const [renamed] = await changes(stream, 1);
      expect(keyOf(renamed).name).to.equal("after the odd key");
      const seen = await changes(everyone, 3);
      const last = keyOf(seen[1]);
      expect(last.expiresAt).to.equal("9999-12-31T23:59:59.999999Z");
      expect(last.lastUsedAt).to.equal("0001-01-01T00:00:00Z");
      expect(last.frozenAt).to.equal("9999-12-31T23:59:59.999999Z");
      everyone.cancel();
      stream.cancel();
      // And every read of that tenant answers.
      const initial = client.open("WatchKeys", { tenantId: odd, sendInitialState: true });
      const current = (await initial.next())?.current as JsonObject | undefined;
      expect(current?.expiresAt).to.equal("9999-12-31T23:59:59.999999Z");
      initial.cancel();
      const listed = await client.call("ListKeyChanges", { tenantId: odd });
      expect(listed.changes as JsonObject[]).to.have.length(2);
      const page = await client.call("FetchKeys", { tenantId: odd });
      expect((page.keys as JsonObject[])[0]?.expiresAt).to.equal("9999-12-31T23:59:59.999999Z");
    });

    it("ends a stream whose initial state loses its database connection with UNAVAILABLE, and serves on", async () => {
      const tenantId = newTenant();
      await insertKeysAt(db.sql, tenantId, "2026-01-01 00:00:00+00", 3000);
      const stream = client.open("WatchKeys", { tenantId, sendInitialState: true });
      await stream.next();
      await db.sql`
        select pg_terminate_backend(pid) from pg_stat_activity
        where application_name = 'keys-driver-service' and state = 'idle in transaction'
          and datname = current_database()
      `;
      const err = await failure(drained(stream));
      expect(err.code, err.rawMessage).to.equal(Code.Unavailable);
      const again = await client.call("CountKeys", { tenantId });
      expect(again.count).to.equal("3000");
    });

    it("ends streams with UNAVAILABLE, not progress markers, while the feed cannot read the table", async () => {
      const own = await createTestDatabase();
      const other = await startTestService(own.url, { watchProgressIntervalMs: 200, watchPollIntervalMs: 100 });
      const ownClient = grpcJsCaller(other.address);
      try {
        const tenantId = newTenant();
        const keyId = await insertKey(own.sql, { tenantId });
        const stream = ownClient.open("WatchKeys", { tenantId });
        const start = ((await stream.next()) as JsonObject).cursor as string;
        await own.sql`alter table key_events rename to key_events_away`;
        await own.sql`update api_keys set name = 'while away' where id = ${keyId}`.catch(() => {});
        const err = await failure(drained(stream));
        expect(err.code, err.rawMessage).to.equal(Code.Unavailable);
        await own.sql`alter table key_events_away rename to key_events`;
        await own.sql`update api_keys set name = 'back' where id = ${keyId}`;
        const resumed = ownClient.open("WatchKeys", { tenantId, resumeCursor: start });
        expect(keyOf((await changes(resumed, 1))[0]).name).to.equal("back");
        resumed.cancel();
      } finally {
        ownClient.close();
        await other.close(1000);
        await own.drop();
      }
    });

    it("gives 20 watchers every one of 8 writers x 500 changes exactly once, in order", async function () {
      this.timeout(120_000);
      const tenantId = newTenant();
      const keys = await Promise.all(Array.from({ length: 8 }, () => insertKey(db.sql, { tenantId })));
      const watchers = Array.from({ length: 20 }, (_, i) =>
        (i % 2 === 0 ? client : grpcJsCaller(service.address)).open("WatchKeys", { tenantId }),
      );
      for (const w of watchers) await w.next();
      // Each writer renames its own key 500 times, some in transactions that
      // linger, so that commits interleave out of the order they began in.
      await Promise.all(
        keys.map(async (keyId, w) => {
          for (let i = 0; i < 500; i++) {
            if (i % 50 === 0) {
              await writer.begin(async (tx) => {
                await rename(tx, tenantId, keyId, `${w}:${i}`);
                await tx`select pg_sleep(0.01)`;
              });
            } else {
              await rename(writer, tenantId, keyId, `${w}:${i}`);
            }
          }
        }),
      );
      for (const w of watchers) {
        const seen = await changes(w, 4000, 20_000);
        const cursors = new Set(seen.map((c) => c.cursor));
        expect(cursors.size, "a change was delivered twice").to.equal(4000);
        for (const [w2, keyId] of keys.entries()) {
          const names = seen.filter((c) => (c.key as JsonObject).id === keyId).map((c) => (c.key as JsonObject).name);
          expect(names).to.deep.equal(Array.from({ length: 500 }, (_, i) => `${w2}:${i}`));
        }
        await quiet(w, 200);
        w.cancel();
      }
    });

    it("loses nothing when the listening connection is terminated mid-stream", async () => {
      const tenantId = newTenant();
      const keyId = await insertKey(db.sql, { tenantId });
      const stream = client.open("WatchKeys", { tenantId });
      await stream.next();
      const killed = await db.sql`
        select pg_terminate_backend(pid) from pg_stat_activity
        where datname = current_database() and query ilike 'listen%'
      `;
      expect(killed.length).to.be.at.least(1);
      for (let i = 0; i < 5; i++) await rename(writer, tenantId, keyId, `after the kill ${i}`);
      const seen = await changes(stream, 5, 15_000);
      expect(seen.map((c) => (c.key as JsonObject).name)).to.deep.equal(
        Array.from({ length: 5 }, (_, i) => `after the kill ${i}`),
      );
      stream.cancel();
    });

    it("keeps an etag valid while the proxy updates the usage counters, and makes no events of them", async () => {
      const tenantId = newTenant();
      const keyId = await insertKey(db.sql, { tenantId });
      const stream = client.open("WatchKeys", { tenantId });
      await stream.next();
      let proxying = true;
      let updates = 0;
      const proxy = (async () => {
        while (proxying) {
          await writer`
            update api_keys set total_requests = total_requests + 1, last_used_at = now()
            where tenant_id = ${tenantId} and id = ${keyId}
          `;
          updates++;
        }
      })();
      try {
        for (let attempt = 0; attempt < 20; attempt++) {
          const { key } = await client.call("FetchKeyForUpdate", { tenantId, keyId });
          await new Promise((r) => setTimeout(r, 5));
          const method = attempt % 2 === 0 ? "UpdateKeyFrozen" : "UpdateKeyUnfrozen";
          const res = await client.call(method, { tenantId, keyId, etag: (key as JsonObject).etag as string });
          expect(res.changed).to.equal(true);
        }
      } finally {
        proxying = false;
        await proxy;
      }
      expect(updates).to.be.above(20);
      const seen = await changes(stream, 20);
      expect(seen.every((c) => c.kind === "KEY_CHANGE_KIND_FROZEN" || c.kind === "KEY_CHANGE_KIND_UNFROZEN")).to.equal(
        true,
      );
      await quiet(stream, 300);
      stream.cancel();
    });

    it("serves the same stream over Connect and gRPC-Web, on HTTP/1.1 and HTTP/2", async () => {
      const tenantId = newTenant();
      const keyId = await insertKey(db.sql, { tenantId });
      const callers = [connectProtocolCaller, grpcWebCaller, connectHttp2Caller, grpcWebHttp2Caller];
      for (const caller of callers.map((make) => make(service.address))) {
        const stream = caller.open("WatchKeys", { tenantId, sendInitialState: true });
        expect(((await stream.next()) as JsonObject).current).to.include({ id: keyId });
        expect(((await stream.next()) as JsonObject).marker).to.equal("WATCH_MARKER_SYNCED");
        await rename(writer, tenantId, keyId, caller.name);
        expect(keyOf((await changes(stream, 1))[0]).name).to.equal(caller.name);
        stream.cancel();
      }
    });

    it("releases everything when streams are cancelled", async () => {
      const tenantId = newTenant();
      const openAndCancel = async () => {
        const streams = Array.from({ length: 20 }, (_, i) =>
          client.open("WatchKeys", { tenantId, sendInitialState: i % 2 === 0 }),
        );
        for (const s of streams) await s.next();
        expect(service.feed.subscribers).to.be.at.least(20);
        for (const s of streams) s.cancel();
        await new Promise((r) => setTimeout(r, 500));
      };
      const measure = async () => ({
        subscribers: service.feed.subscribers,
        connections: await serviceConnections(db),
        timers: process.getActiveResourcesInfo().filter((r) => r === "Timeout").length,
      });
      // Once to let the pool and the clients open what they keep open anyway.
      await openAndCancel();
      const before = await measure();
      await openAndCancel();
      const after = await measure();
      expect(after.subscribers).to.equal(before.subscribers);
      expect(after.connections).to.be.at.most(before.connections);
      expect(after.timers).to.be.at.most(before.timers);
    });
  });

  describe("when the server shuts down", () => {
    it("ends open streams with UNAVAILABLE, so that clients reconnect elsewhere", async () => {
      const other = await startTestService(db.url, { watchProgressIntervalMs: 300 });
      const client = grpcJsCaller(other.address);
      const stream = client.open("WatchKeys", { tenantId: newTenant() });
      await stream.next();
      const closing = other.close(5000);
      const err = await failure(drained(stream));
      expect(err.code, err.rawMessage).to.equal(Code.Unavailable);
      await closing;
      client.close();
    });

    it("ends a stream still sending its initial state with UNAVAILABLE", async () => {
      const other = await startTestService(db.url, { watchProgressIntervalMs: 300 });
      const client = grpcJsCaller(other.address);
      const tenantId = newTenant();
      await insertKeysAt(db.sql, tenantId, "2026-01-01 00:00:00+00", 3000);
      const stream = client.open("WatchKeys", { tenantId, sendInitialState: true });
      await stream.next();
      const closing = other.close(5000);
      const err = await failure(drained(stream));
      expect(err.code, err.rawMessage).to.equal(Code.Unavailable);
      await closing;
      client.close();
    });
  });
});

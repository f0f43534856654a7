import type { Sql } from "../../src/db/client.js";
import { findServiceSecret } from "../../src/db/secrets.js";
import { type RunningServer, startServer } from "../../src/server.js";
import { createKeysDriverService } from "../../src/service/keys-driver.js";
import { createPageTokenCodec } from "../../src/service/page-token.js";
import { createPostgresStore } from "../../src/store.js";
import { createTestDatabase, type TestDatabase } from "./database.js";

/** The real server on a free port, over the given database. */
export async function startTestService(sql: Sql): Promise<RunningServer> {
  const secret = await findServiceSecret(sql, "page_token");
  if (!secret) throw new Error("the test database has no page token secret");
  const handlers = createKeysDriverService({
    store: createPostgresStore(sql),
    pageTokens: createPageTokenCodec(secret),
    logError: () => {},
  });
  return await startServer({ handlers, host: "127.0.0.1", port: 0 });
}

/** What a suite that calls the real server works with. */
export interface ServiceUnderTest {
  readonly db: TestDatabase;
  readonly server: RunningServer;
}

/**
 * Registers mocha hooks that give the calling suite a fresh database and the
 * real server on it, torn down after the suite; read the fields in tests.
 */
export function useTestService(): ServiceUnderTest {
  const state = {} as { db: TestDatabase; server: RunningServer };
  before(async () => {
    state.db = await createTestDatabase();
    state.server = await startTestService(state.db.sql);
  });
  after(async () => {
    await state.server?.close(1000);
    await state.db?.drop();
  });
  return {
    get db() {
      return state.db;
    },
    get server() {
      return state.server;
    },
  };
}

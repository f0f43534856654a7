import type { Sql } from "../../src/db/client.js";
import { findServiceSecret } from "../../src/db/secrets.js";
import { type RunningServer, startServer } from "../../src/server.js";
import { createKeysDriverService } from "../../src/service/keys-driver.js";
import { createPageTokenCodec } from "../../src/service/page-token.js";
import { createPostgresStore } from "../../src/store.js";

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

// The road not taken, kept measurable: the service's own handlers served
// over gRPC (h2c) by connect-node alone, as docs/DESIGN.md compares with the
// grpc-js path. Env: DATABASE_URL, PORT. Prints "listening <port>".
import http2 from "node:http2";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { createSql } from "../src/db/client.js";
import { findServiceSecret } from "../src/db/secrets.js";
import { createStore } from "../src/db/store.js";
import { startKeyFeed } from "../src/feed/key-feed.js";
import { observeCalls } from "../src/interceptors.js";
import { createPositionTokens } from "../src/rpc/cursors.js";
import { createHealthService, HealthState } from "../src/rpc/health.js";
import { createKeysDriverService } from "../src/rpc/keys-driver.js";
import { createPageTokenCodec } from "../src/rpc/page-token.js";
import { createTokenSigner } from "../src/rpc/signed-token.js";

const sql = createSql({ url: process.env.DATABASE_URL ?? "", poolMax: 10, statementTimeoutMs: 10_000 });
const secret = await findServiceSecret(sql, "page_token");
if (!secret) throw new Error("no page token secret");
const signer = createTokenSigner(secret);
const feed = startKeyFeed(sql, { pollIntervalMs: 5000, onError: console.error });
// Wrapped as the service wraps them (src/server.ts), so that both sides do the same work per call.
const handlers = observeCalls(
  KeysDriverService,
  createKeysDriverService({
    store: createStore(sql),
    pageTokens: createPageTokenCodec(signer),
    positions: createPositionTokens(signer),
    feed,
    watch: { progressIntervalMs: 15_000, maxQueuedChanges: 10_000, initialStateReaders: 5 },
  }),
  {},
);
const server = http2.createServer(
  connectNodeAdapter({
    routes: (router) =>
      router
        .service(KeysDriverService, handlers)
        .service(Health, observeCalls(Health, createHealthService(new HealthState()), {})),
  }),
);
server.listen(Number(process.env.PORT ?? 0), "127.0.0.1", () => {
  const address = server.address();
  console.log(`listening ${typeof address === "object" && address ? address.port : 0}`);
});
process.on("SIGTERM", () => {
  server.close();
  void feed.close();
  sql.end().then(() => process.exit(0));
});

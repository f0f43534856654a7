import { register } from "node:module";

// postgres.js, loaded with the fixes in ./postgres-fixes.js applied. Every
// module of the service takes the driver from here: a static import of
// "postgres" anywhere would load the module before the fix is registered.
register("./postgres-fixes.js", import.meta.url);
const { default: postgres } = await import("postgres");

const patched = (globalThis as Record<symbol, Set<string> | undefined>)[
  Symbol.for("keys-driver-service.postgres-fixes")
];
if (!patched?.has("connection.js") || !patched.has("index.js")) {
  throw new Error(
    "postgres.js was loaded without the fix in src/db/postgres-fixes.js " +
      '(was "postgres" imported directly somewhere before src/db/postgres.ts?)',
  );
}

export default postgres;

import { register } from "node:module";

// postgres.js, loaded with the fix in ./postgres-rows-fix.js applied. Every
// module of the service takes the driver from here: a static import of
// "postgres" anywhere would load the module before the fix is registered.
register("./postgres-rows-fix.js", import.meta.url);
const { default: postgres } = await import("postgres");

if ((globalThis as Record<symbol, unknown>)[Symbol.for("keys-driver-service.postgres-rows-fix")] !== true) {
  throw new Error(
    "postgres.js was loaded without the fix in src/db/postgres-rows-fix.js " +
      '(was "postgres" imported directly somewhere before src/db/postgres.ts?)',
  );
}

export default postgres;

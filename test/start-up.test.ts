import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { expect } from "chai";
import { loadConfig } from "../src/config.js";
import { createSql } from "../src/db/client.js";
import { serviceNodeArgs } from "../src/process/node-args.js";
import { migrate, pendingMigrations } from "../src/schema/migrate.js";
import { createTestDatabase } from "./support/database.js";

function runService(env: Record<string, string>): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...serviceNodeArgs, "src/main.ts"], {
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.on("data", (d) => {
      output += d;
    });
    child.stderr.on("data", (d) => {
      output += d;
    });
    child.on("exit", (code) => resolve({ code, output }));
  });
}

describe("migrations", () => {
  it("apply in order, are recorded, and running them again changes nothing", async () => {
    const db = await createTestDatabase({ migrated: false });
    try {
      const pending = await pendingMigrations(db.sql);
      expect(pending.map((m) => m.version)).to.deep.equal([1, 2, 3, 4, 5, 6, 7]);
      expect((await migrate(db.sql)).map((m) => m.file)).to.deep.equal([
        "0001_keys_and_calls.sql",
        "0002_usage_rollup.sql",
        "0003_epoch_micros.sql",
        "0004_key_events.sql",
        "0005_usage_by_hour_and_model.sql",
        "0006_usage_running_totals.sql",
        "0007_service_role.sql",
      ]);
      expect(await migrate(db.sql)).to.deep.equal([]);
      expect(await pendingMigrations(db.sql)).to.deep.equal([]);
    } finally {
      await db.drop();
    }
  });

  it("are safe when several processes run them at once", async () => {
    const db = await createTestDatabase({ migrated: false });
    try {
      const runs = await Promise.all([migrate(db.sql), migrate(db.sql), migrate(db.sql)]);
      expect(runs.flat().map((m) => m.version)).to.have.members([1, 2, 3, 4, 5, 6, 7]);
      const [row]: [{ n: bigint }?] = await db.sql`select count(*) as n from service_secrets`;
      expect(row?.n).to.equal(1n);
    } finally {
      await db.drop();
    }
  });
});

describe("migrations as an owner that may not create roles", () => {
  it("apply when the service's role exists already, as the README says to make it", async () => {
    // Any migrated database of the server has made the role.
    const db = await createTestDatabase({ migrated: false });
    const owner = `keys_test_owner_${process.pid}`;
    await db.sql.unsafe(`create role ${owner} login password 'not-a-secret'`);
    await db.sql.unsafe(`alter database ${new URL(db.url).pathname.slice(1)} owner to ${owner}`);
    await db.sql.unsafe(`alter schema public owner to ${owner}`);
    const url = new URL(db.url);
    url.username = owner;
    url.password = "not-a-secret";
    const asOwner = createSql({ url: url.toString(), poolMax: 1, statementTimeoutMs: 0 });
    try {
      const applied = await migrate(asOwner);
      expect(applied.map((m) => m.version)).to.include(7);
      const [role] = await asOwner`select rolcreaterole from pg_roles where rolname = current_user`;
      expect(role?.rolcreaterole).to.equal(false);
    } finally {
      await asOwner.end();
      await db.sql.unsafe(`drop owned by ${owner} cascade`);
      await db.drop();
      const admin = createSql({ url: db.url.replace(/\/[^/]*$/, "/postgres"), poolMax: 1, statementTimeoutMs: 0 });
      await admin.unsafe(`drop role if exists ${owner}`);
      await admin.end();
    }
  });
});

describe("starting the service", () => {
  it("refuses to start on a DATABASE_URL whose schema is behind, and says how to fix it", async () => {
    const db = await createTestDatabase({ migrated: false });
    try {
      const { code, output } = await runService({ DATABASE_URL: db.url, PORT: "0" });
      expect(code).to.equal(1);
      expect(output).to.contain("schema is behind").and.contain("npm run migrate");
    } finally {
      await db.drop();
    }
  });

  it("refuses a bad setting, naming the variable", async () => {
    const { code, output } = await runService({ PORT: "http", DATABASE_URL: "postgres://x@127.0.0.1:1/x" });
    expect(code).to.equal(1);
    expect(output).to.contain("PORT must be a whole number");
  });

  it("says in one line why a DATABASE_URL cannot be used", async () => {
    const closed = await runService({ DATABASE_URL: "postgres://x@127.0.0.1:1/x", PORT: "0" });
    expect(closed.code).to.equal(1);
    expect(closed.output).to.contain(
      "cannot use the database at 127.0.0.1:1/x: nothing listens there; check DATABASE_URL",
    );
    const db = await createTestDatabase();
    try {
      const missing = new URL(db.url);
      missing.pathname = "/no_such_database";
      const absent = await runService({ DATABASE_URL: missing.toString(), PORT: "0" });
      expect(absent.code).to.equal(1);
      expect(absent.output).to.contain("the database does not exist");
      for (const run of [closed, absent]) expect(run.output).to.not.match(/\n\s+at /);
    } finally {
      await db.drop();
    }
  });

  it("refuses a DATABASE_URL user that may not act as the service's role, saying what to grant", async () => {
    const db = await createTestDatabase();
    const login = `keys_test_login_${process.pid}`;
    await db.sql.unsafe(`create role ${login} login password 'not-a-secret'`);
    try {
      const url = new URL(db.url);
      url.username = login;
      url.password = "not-a-secret";
      const refused = await runService({ DATABASE_URL: url.toString(), PORT: "0" });
      expect(refused.code, refused.output).to.equal(1);
      expect(refused.output).to.contain(
        `DATABASE_URL's user ${login} may not act as keys_driver_service (DATABASE_ROLE); as the owner, run: grant keys_driver_service to ${login}`,
      );
      const unknown = await runService({ DATABASE_URL: db.url, DATABASE_ROLE: "no_such_role", PORT: "0" });
      expect(unknown.code).to.equal(1);
      expect(unknown.output).to.contain("the role no_such_role (DATABASE_ROLE) does not exist");
      for (const run of [refused, unknown]) expect(run.output).to.not.match(/\n\s+at /);
    } finally {
      await db.sql.unsafe(`drop role if exists ${login}`);
      await db.drop();
    }
  });

  it("runs under npm start with the node flags every other launcher uses", async () => {
    const pkg = JSON.parse(await readFile("package.json", "utf8")) as { scripts: Record<string, string> };
    expect(pkg.scripts.start).to.equal(`exec node ${serviceNodeArgs.join(" ")} src/main.ts`);
  });

  it("reads every setting, with defaults", () => {
    expect(loadConfig({})).to.deep.include({ host: "127.0.0.1", port: 50051, poolMax: 10, databaseUrl: undefined });
    expect(() => loadConfig({ DATABASE_URL: "mysql://x" })).to.throw("DATABASE_URL");
    expect(() => loadConfig({ DATABASE_POOL_MAX: "0" })).to.throw("DATABASE_POOL_MAX");
    expect(() => loadConfig({ PAGE_TOKEN_SECRET: "short" })).to.throw("PAGE_TOKEN_SECRET");
  });
});

describe("the database client", () => {
  it("sends one query at a time per connection, so throughput holds under sustained load", async () => {
    // postgres.js's default pipeline of 100 decays under load (docs/DESIGN.md);
    // `npm run bench -- --soak` measures it, this keeps the setting from slipping.
    const sql = createSql({ url: "postgres://x@127.0.0.1:1/x", poolMax: 3, statementTimeoutMs: 0 });
    expect(sql.options).to.include({ max_pipeline: 1, max: 3 });
    await sql.end();
  });
});

import { stopTestServer } from "./database.js";

/** Mocha root hooks: the run's database server stops after the last test. */
export const mochaHooks = {
  async afterAll(this: Mocha.Context) {
    this.timeout(30_000);
    await stopTestServer();
  },
};

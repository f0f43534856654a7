import { Code, ConnectError } from "@connectrpc/connect";
import { expect } from "chai";
import { toConnectError } from "../src/errors.js";

// The one mapper from whatever escaped a handler to the status the caller sees.

describe("toConnectError", () => {
  const logged: string[] = [];
  const log = (message: string) => {
    logged.push(message);
  };
  beforeEach(() => {
    logged.length = 0;
  });

  it("passes the handlers' own errors through", () => {
    const own = new ConnectError("tenant_id: must be a UUID", Code.InvalidArgument);
    expect(toConnectError(own, log)).to.equal(own);
    expect(logged).to.deep.equal([]);
  });

  it("makes a cancelled call's abort CANCELLED, not INTERNAL, and logs nothing", () => {
    const controller = new AbortController();
    controller.abort();
    let aborted: unknown;
    try {
      controller.signal.throwIfAborted();
    } catch (err) {
      aborted = err;
    }
    expect(toConnectError(aborted, log).code).to.equal(Code.Canceled);
    expect(logged).to.deep.equal([]);
  });

  it("maps database trouble to statuses a caller can act on", () => {
    const pg = (code: string) => Object.assign(new Error("from the database"), { code });
    expect(toConnectError(pg("57014"), log).code).to.equal(Code.DeadlineExceeded);
    expect(toConnectError(pg("40001"), log).code).to.equal(Code.Aborted);
    expect(toConnectError(pg("57P01"), log).code).to.equal(Code.Unavailable);
    expect(toConnectError(pg("CONNECTION_CLOSED"), log).code).to.equal(Code.Unavailable);
  });

  it("sends a fixed message for anything else, and logs the cause", () => {
    const err = toConnectError(new Error("select secret from somewhere"), log);
    expect(err.code).to.equal(Code.Internal);
    expect(err.rawMessage).to.equal("internal error");
    expect(logged).to.deep.equal(["internal error"]);
  });
});

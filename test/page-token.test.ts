import { Code, ConnectError } from "@connectrpc/connect";
import { expect } from "chai";
import { createPageTokenCodec } from "../src/rpc/page-token.js";

describe("page tokens", () => {
  const codec = createPageTokenCodec(new Uint8Array(32).fill(7));
  const tenant = "11111111-1111-4111-8111-111111111111";
  const cursor = { createdAtUs: 1_764_060_062_123_457n, id: "aaaaaaaa-0000-4000-8000-000000000001" };

  it("carry the exact keyset position back", () => {
    expect(codec.decode(tenant, codec.encode(tenant, cursor))).to.deep.equal(cursor);
  });

  it("are refused when any single byte was changed", () => {
    const bytes = Buffer.from(codec.encode(tenant, cursor), "base64url");
    for (let i = 0; i < bytes.length; i++) {
      const edited = Buffer.from(bytes);
      edited[i] = (edited[i] ?? 0) ^ 1;
      expect(() => codec.decode(tenant, edited.toString("base64url")), `byte ${i}`).to.throw(
        ConnectError,
        "page_token",
      );
    }
  });

  it("are refused by a service with another secret", () => {
    const other = createPageTokenCodec(new Uint8Array(32).fill(8));
    try {
      other.decode(tenant, codec.encode(tenant, cursor));
      expect.fail("accepted");
    } catch (err) {
      expect((err as ConnectError).code).to.equal(Code.InvalidArgument);
    }
  });
});

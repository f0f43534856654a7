import { createHmac } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { expect } from "chai";
import { createPositionTokens } from "../src/rpc/cursors.js";
import { createPageTokenCodec } from "../src/rpc/page-token.js";
import { createTokenSigner } from "../src/rpc/signed-token.js";

const secret = new Uint8Array(32).fill(7);
const tenant = "11111111-1111-4111-8111-111111111111";

function expectRefused(decode: () => unknown, field: string, what: string): void {
  try {
    decode();
  } catch (err) {
    expect(err, what).to.be.instanceOf(ConnectError);
    expect((err as ConnectError).code, what).to.equal(Code.InvalidArgument);
    expect((err as ConnectError).rawMessage, what).to.contain(field);
    return;
  }
  expect.fail(`${what}: accepted`);
}

describe("page tokens", () => {
  const codec = createPageTokenCodec(createTokenSigner(secret));
  const cursor = { createdAtUs: 1_764_060_062_123_457n, id: "aaaaaaaa-0000-4000-8000-000000000001" };

  it("carry the exact keyset position back", () => {
    expect(codec.decode(tenant, codec.encode(tenant, cursor))).to.deep.equal(cursor);
  });

  it("are refused when any single byte was changed", () => {
    const bytes = Buffer.from(codec.encode(tenant, cursor), "base64url");
    for (let i = 0; i < bytes.length; i++) {
      const edited = Buffer.from(bytes);
      edited[i] = (edited[i] ?? 0) ^ 1;
      expectRefused(() => codec.decode(tenant, edited.toString("base64url")), "page_token", `byte ${i}`);
    }
  });

  it("are refused when any single character was changed, the last one included", () => {
    const token = codec.encode(tenant, cursor);
    const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for (let i = 0; i < token.length; i++) {
      for (const c of alphabet) {
        if (c === token[i]) continue;
        const edited = token.slice(0, i) + c + token.slice(i + 1);
        expectRefused(() => codec.decode(tenant, edited), "page_token", `character ${i} as ${c}`);
      }
    }
  });

  it("are refused by a service with another secret, and for another tenant", () => {
    const other = createPageTokenCodec(createTokenSigner(new Uint8Array(32).fill(8)));
    expectRefused(() => other.decode(tenant, codec.encode(tenant, cursor)), "page_token", "other secret");
    expectRefused(
      () => codec.decode("22222222-2222-4222-8222-222222222222", codec.encode(tenant, cursor)),
      "page_token",
      "other tenant",
    );
  });

  it("issued before tokens were signed by the shared signer are still accepted", () => {
    // The earlier layout: payload, then HMAC-SHA256(payload, "FetchKeys\0" + tenant) cut to 16 bytes.
    const payload = Buffer.alloc(25);
    payload.writeUInt8(1, 0);
    payload.writeBigInt64BE(cursor.createdAtUs, 1);
    Buffer.from(cursor.id.replaceAll("-", ""), "hex").copy(payload, 9);
    const mac = createHmac("sha256", Buffer.from(secret)).update(payload).update(`FetchKeys\u0000${tenant}`).digest();
    const token = Buffer.concat([payload, mac.subarray(0, 16)]).toString("base64url");
    expect(codec.decode(tenant, token)).to.deep.equal(cursor);
  });
});

describe("watch cursors and change page tokens", () => {
  const tokens = createPositionTokens(createTokenSigner(secret));
  const mine = { allTenants: false, tenantId: tenant, keyIds: [] } as const;

  it("carry their position back, whatever keys the stream filters on", () => {
    const cursor = tokens.cursor(mine, 123_456_789n);
    expect(tokens.positionOfCursor({ ...mine, keyIds: ["aaaaaaaa-0000-4000-8000-000000000001"] }, cursor)).to.equal(
      123_456_789n,
    );
    expect(tokens.positionOfPageToken(tenant, undefined, tokens.pageToken(tenant, undefined, 7n))).to.equal(7n);
  });

  it("are refused for another tenant, for all tenants, for another key, or as the other kind", () => {
    const cursor = tokens.cursor(mine, 5n);
    const theirs = { allTenants: false, tenantId: "22222222-2222-4222-8222-222222222222", keyIds: [] } as const;
    expectRefused(() => tokens.positionOfCursor(theirs, cursor), "resume_cursor", "another tenant");
    expectRefused(() => tokens.positionOfCursor({ allTenants: true }, cursor), "resume_cursor", "all tenants");
    expectRefused(
      () => tokens.positionOfCursor(mine, tokens.cursor({ allTenants: true }, 5n)),
      "resume_cursor",
      "an all-tenants cursor for one tenant",
    );
    const page = tokens.pageToken(tenant, "aaaaaaaa-0000-4000-8000-000000000001", 5n);
    expectRefused(() => tokens.positionOfPageToken(tenant, undefined, page), "page_token", "another key filter");
    expectRefused(() => tokens.positionOfCursor(mine, page), "resume_cursor", "a page token as a cursor");
  });
});

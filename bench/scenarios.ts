// The benchmark's scenarios: what is called, with which varied requests,
// and the same work in-process ("raw") as the ceiling without RPC. A new
// scenario is one more entry in `scenarios` below.
import { create, type DescMessage, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { HealthCheckRequestSchema } from "../gen/grpc/health/v1/health_pb.js";
import {
  FetchKeyByIdRequestSchema,
  FetchKeysRequestSchema,
  FetchKeyUsageRequestSchema,
  UpdateKeyFrozenRequestSchema,
  UpdateKeyUnfrozenRequestSchema,
} from "../gen/keysdriver/v1/keys_driver_pb.js";
import type { Sql } from "../src/db/client.js";
import type { Store } from "../src/db/store.js";
import type { PageTokenCodec } from "../src/rpc/page-token.js";
import type { PlannedCall } from "./load.js";
import { dataStart, type Scale } from "./seed.js";

/** One thing the benchmark measures. */
export interface Scenario {
  readonly name: string;
  /** The requests the load generator cycles through. */
  readonly calls: PlannedCall[];
  /** The same store work, run in-process: the ceiling without RPC (none for the empty rpc). */
  readonly raw?: (i: number) => Promise<unknown>;
  /** Compared with the grpc-js peer (bench/peer.ts implements it too). */
  readonly peer: boolean;
  /** Also measured with connect-node serving gRPC (the transport not chosen). */
  readonly viaConnect?: boolean;
}

/** Ids and tokens from the data set that the scenarios' requests use. */
export interface Fixtures {
  readonly sample: { tenant_id: string; key_id: string }[];
  readonly tenants: string[];
  readonly bigTenants: string[];
  readonly deepTokens: { tenantId: string; token: string }[];
  readonly hotKeys: { tenant_id: string; key_id: string }[];
}

const dayMs = 86_400_000;
const kd = "/keysdriver.v1.KeysDriverService";
const ts = (ms: number) => timestampFromDate(new Date(ms));

/** A gRPC length-prefixed request message, base64 (the load generator's form). */
export function frame<D extends DescMessage>(schema: D, init: MessageInitShape<D>): string {
  const body = toBinary(schema, create(schema, init));
  const out = Buffer.alloc(5 + body.length);
  out.writeUInt32BE(body.length, 1);
  out.set(body, 5);
  return out.toString("base64");
}

/** Reads the fixtures from the seeded database. */
export async function loadFixtures(sql: Sql, tokens: PageTokenCodec, scale: Scale): Promise<Fixtures> {
  const sample = await sql<{ tenant_id: string; key_id: string }[]>`
    select tenant_id::text, key_id::text from bench.sample order by n limit 2000
  `;
  const tenants = [...new Set(sample.map((s) => s.tenant_id))].slice(0, 500);
  const bigTenants = (
    await sql<{ t: string }[]>`
      select bench.tenant_of((i - 1) * ${scale.bigTenantKeys} + 1)::text as t
      from generate_series(1, ${scale.bigTenants}) as i
    `
  ).map((r) => r.t);
  const depth = scale.bigTenantKeys - 50;
  const deepTokens: { tenantId: string; token: string }[] = [];
  for (const tenantId of bigTenants) {
    for (const cursor of await keysetPositions(sql, tenantId, depth - 10, 10)) {
      deepTokens.push({ tenantId, token: tokens.encode(tenantId, cursor) });
    }
  }
  const hotKeys = await sql<{ tenant_id: string; key_id: string }[]>`
    select bench.tenant_of(k)::text as tenant_id, bench.key_id(k)::text as key_id
    from generate_series(1, ${scale.hotKeys}) as k
  `;
  return { sample, tenants, bigTenants, deepTokens, hotKeys };
}

/** The FetchKeys positions of `count` keys of a tenant from `offset` on, newest first. */
export async function keysetPositions(sql: Sql, tenantId: string, offset: number, count: number) {
  const rows = await sql<{ created_at_us: bigint; id: string }[]>`
    select epoch_micros(created_at) as created_at_us, id::text
    from api_keys where tenant_id = ${tenantId}
    order by created_at desc, id desc
    offset ${offset} limit ${count}
  `;
  return rows.map((r) => ({ createdAtUs: r.created_at_us, id: r.id }));
}

/** [since, until) windows of `days` days over the data, edges at 10:00 UTC. */
export function windows(scale: Scale, days: number, count: number): [number, number][] {
  const start = Date.parse(dataStart) + 10 * 3_600_000;
  const room = Math.max(1, scale.days - days);
  return Array.from({ length: count }, (_, i) => {
    const since = start + (i % room) * dayMs + (i % 7) * 60_000;
    return [since, since + days * dayMs];
  });
}

/** Every scenario, in the order they run. */
export function scenarios(f: Fixtures, store: Store, tokens: PageTokenCodec, scale: Scale): Scenario[] {
  const pick = <T>(list: T[], i: number) => list[i % list.length] as T;
  const usage = (days: number) => {
    const list = windows(scale, days, 60).flatMap(([since, until]) => f.hotKeys.map((k) => ({ ...k, since, until })));
    return {
      calls: list.map((u) => ({
        path: `${kd}/FetchKeyUsage`,
        frame: frame(FetchKeyUsageRequestSchema, {
          tenantId: u.tenant_id,
          keyId: u.key_id,
          since: ts(u.since),
          until: ts(u.until),
        }),
      })),
      raw: (i: number) => {
        const u = pick(list, i);
        return store.fetchKeyUsage(u.tenant_id, u.key_id, {
          sinceUs: BigInt(u.since) * 1000n,
          untilUs: BigInt(u.until) * 1000n,
        });
      },
    };
  };
  const freezeKeys = f.sample.slice(1000, 1500);
  return [
    {
      name: "empty rpc (Health.Check)",
      calls: [{ path: "/grpc.health.v1.Health/Check", frame: frame(HealthCheckRequestSchema, {}) }],
      peer: true,
      viaConnect: true,
    },
    {
      name: "FetchKeyById",
      calls: f.sample.map((s) => ({
        path: `${kd}/FetchKeyById`,
        frame: frame(FetchKeyByIdRequestSchema, { tenantId: s.tenant_id, keyId: s.key_id }),
      })),
      raw: (i) => store.fetchKeyById(pick(f.sample, i).tenant_id, pick(f.sample, i).key_id),
      peer: true,
      viaConnect: true,
    },
    {
      name: "FetchKeys first page (50)",
      calls: f.tenants.map((t) => ({
        path: `${kd}/FetchKeys`,
        frame: frame(FetchKeysRequestSchema, { tenantId: t, pageSize: 50 }),
      })),
      raw: (i) => store.fetchKeys(pick(f.tenants, i), { skip: 0, limit: 51 }),
      peer: true,
    },
    {
      name: `FetchKeys deep page (depth ${scale.bigTenantKeys - 50})`,
      calls: f.deepTokens.map((d) => ({
        path: `${kd}/FetchKeys`,
        frame: frame(FetchKeysRequestSchema, { tenantId: d.tenantId, pageSize: 50, pageToken: d.token }),
      })),
      raw: (i) => {
        const d = pick(f.deepTokens, i);
        return store.fetchKeys(d.tenantId, { cursor: tokens.decode(d.tenantId, d.token), skip: 0, limit: 51 });
      },
      peer: true,
    },
    { name: "FetchKeyUsage hot key, 1 day", ...usage(1), peer: true },
    { name: `FetchKeyUsage hot key, ${scale.days} days`, ...usage(scale.days), peer: true },
    {
      name: "UpdateKeyFrozen/Unfrozen",
      calls: freezeKeys.flatMap((k) => [
        {
          path: `${kd}/UpdateKeyFrozen`,
          frame: frame(UpdateKeyFrozenRequestSchema, { tenantId: k.tenant_id, keyId: k.key_id }),
        },
        {
          path: `${kd}/UpdateKeyUnfrozen`,
          frame: frame(UpdateKeyUnfrozenRequestSchema, { tenantId: k.tenant_id, keyId: k.key_id }),
        },
      ]),
      raw: (i) => {
        const k = pick(freezeKeys, i >> 1);
        const change = { tenantId: k.tenant_id, keyId: k.key_id, reason: null, actor: null };
        return i % 2 === 0 ? store.updateKeyFrozen(change) : store.updateKeyUnfrozen(change);
      },
      peer: true,
    },
  ];
}

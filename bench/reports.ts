// The benchmark's usage-report measurements: FetchUsageReport through the
// service, one call at a time from the load generator (as every other
// scenario is measured), against the plain GROUP BY over proxy_calls it
// replaces, run on the same database.
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  FetchUsageReportRequestSchema,
  KeysDriverService,
  UsageBucketWidth,
  UsageGrouping,
  UsageReportOrder,
} from "../gen/keysdriver/v1/keys_driver_pb.js";
import type { Sql } from "../src/db/client.js";
import { measureServer, type ServerProcess, type Settings, sequentialP50 } from "./measure.js";
import { type Fixtures, frame } from "./scenarios.js";
import { dataStart, type Scale } from "./seed.js";

/** One report's p50 through the service and as a plain GROUP BY. */
export interface ReportResult {
  readonly name: string;
  readonly oursMs: number;
  readonly groupByMs: number;
  /** Rows of the service's first page. */
  readonly rows: number;
  /** The target p50 in ms. */
  readonly targetMs: number;
}

const dayMs = 86_400_000;

/** The three reports of the speed targets, on the data set's last days. */
export async function measureReports(
  settings: Settings,
  ours: ServerProcess,
  sql: Sql,
  fixtures: Fixtures,
  scale: Scale,
): Promise<ReportResult[]> {
  const client = createClient(KeysDriverService, createGrpcTransport({ baseUrl: `http://${ours.address}` }));
  const hot = fixtures.hotKeys[0] ?? { tenant_id: "", key_id: "" };
  const bigTenant = fixtures.bigTenants[0] ?? "";
  const end = Date.parse(dataStart) + scale.days * dayMs;
  // Each call's window ends a day earlier than the one before, over five days.
  const window = (days: number, i: number) => {
    const until = end - (i % 5) * dayMs;
    return { since: new Date(until - days * dayMs), until: new Date(until) };
  };
  // The hot key's calls in hourly or daily buckets, as a plain GROUP BY.
  const hotKeyBuckets = (unit: "hour" | "day", since: Date, until: Date) => sql`
    select date_trunc(${unit}, created_at, 'UTC') as bucket, count(*), sum(cost_cents)
    from proxy_calls
    where tenant_id = ${hot.tenant_id} and api_key_id = ${hot.key_id}
      and created_at >= ${since.toISOString()}::timestamptz and created_at < ${until.toISOString()}::timestamptz
    group by 1 order by 1
  `;
  const cases = [
    {
      name: `${scale.days} days in daily buckets, one hot key`,
      targetMs: 5,
      days: scale.days,
      request: { tenantId: hot.tenant_id, keyIds: [hot.key_id], bucketWidth: UsageBucketWidth.DAY, pageSize: 1000 },
      groupBy: (since: Date, until: Date) => hotKeyBuckets("day", since, until),
    },
    {
      name: "7 days in hourly buckets, one hot key",
      targetMs: 20,
      days: 7,
      request: { tenantId: hot.tenant_id, keyIds: [hot.key_id], bucketWidth: UsageBucketWidth.HOUR, pageSize: 1000 },
      groupBy: (since: Date, until: Date) => hotKeyBuckets("hour", since, until),
    },
    {
      name: `30 days per key, the ${scale.bigTenantKeys}-key tenant, first 100 keys by spend`,
      targetMs: 50,
      days: 30,
      request: {
        tenantId: bigTenant,
        groupBy: [UsageGrouping.KEY],
        orderBy: UsageReportOrder.SPEND_DESCENDING,
        pageSize: 100,
      },
      groupBy: (since: Date, until: Date) => sql`
        select api_key_id, count(*), sum(cost_cents) as spend
        from proxy_calls
        where tenant_id = ${bigTenant}
          and created_at >= ${since.toISOString()}::timestamptz and created_at < ${until.toISOString()}::timestamptz
        group by 1 order by spend desc limit 100
      `,
    },
  ];
  const results: ReportResult[] = [];
  for (const c of cases) {
    // The five windows the calls cycle through, and the first one's page size, through a real client.
    const requests = [0, 1, 2, 3, 4].map((i) => {
      const { since, until } = window(c.days, i);
      return { ...c.request, since: timestampFromDate(since), until: timestampFromDate(until) };
    });
    const rows = (await client.fetchUsageReport(requests[0] ?? {})).rows.length;
    const calls = requests.map((r) => ({
      path: "/keysdriver.v1.KeysDriverService/FetchUsageReport",
      frame: frame(FetchUsageReportRequestSchema, r),
    }));
    const { measured } = await measureServer({ ...settings, concurrency: 1, connections: 1 }, ours, calls, 5000);
    if (Object.keys(measured.errors).length > 0) {
      throw new Error(`${c.name}: calls failed: ${JSON.stringify(measured.errors)}`);
    }
    // The GROUP BY is far slower on large windows: fewer runs.
    const groupByMs = await sequentialP50(async (i) => {
      const { since, until } = window(c.days, i);
      await c.groupBy(since, until);
    }, 10);
    results.push({ name: c.name, oursMs: measured.p50Ms, groupByMs, rows, targetMs: c.targetMs });
  }
  return results;
}

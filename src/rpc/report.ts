import { create } from "@bufbuild/protobuf";
import {
  type FetchUsageReportRequest,
  UsageBucketWidth,
  UsageGrouping,
  UsageReportOrder,
  type UsageReportRow,
  UsageReportRowSchema,
} from "../../gen/keysdriver/v1/keys_driver_pb.js";
import type { BucketWidth, ReportOrder, ReportPosition, ReportQuery, ReportRow } from "../db/store.js";
import { invalidArgument } from "../errors.js";
import { timestampFromMicros } from "./snapshots.js";
import { optionalTimestamp, requireTimestamp, requireUuid } from "./validate.js";

/** The most key_ids one report may name. */
const maxReportKeys = 1000;

const nilUuid = "00000000-0000-0000-0000-000000000000";
const maxInt64 = 9_223_372_036_854_775_807n;
const minInt64 = -9_223_372_036_854_775_808n;

/**
 * A FetchUsageReport request, checked: the store's query but its page
 * (key_ids lower-cased, each once, sorted), and those fields in one
 * canonical string, which a page token is bound to.
 */
export type ReportRequest = Omit<ReportQuery, "after" | "limit"> & { readonly shape: string };

function widthOf(value: UsageBucketWidth): BucketWidth {
  switch (value) {
    case UsageBucketWidth.UNSPECIFIED:
      return "none";
    case UsageBucketWidth.HOUR:
      return "hour";
    case UsageBucketWidth.DAY:
      return "day";
    default:
      throw invalidArgument("bucket_width", "must be USAGE_BUCKET_WIDTH_HOUR or USAGE_BUCKET_WIDTH_DAY, or unset");
  }
}

function orderOf(value: UsageReportOrder): ReportOrder {
  switch (value) {
    case UsageReportOrder.UNSPECIFIED:
      return "time";
    case UsageReportOrder.SPEND_DESCENDING:
      return "spend";
    default:
      throw invalidArgument("order_by", "must be USAGE_REPORT_ORDER_SPEND_DESCENDING or unset");
  }
}

/** Checks a FetchUsageReport request's fields but tenant_id, page_size and page_token. */
export function reportRequest(req: FetchUsageReportRequest): ReportRequest {
  const keyIds =
    req.keyIds.length === 0
      ? undefined
      : [...new Set(req.keyIds.map((id, i) => requireUuid(`key_ids[${i}]`, id)))].sort();
  if (keyIds && keyIds.length > maxReportKeys) {
    throw invalidArgument("key_ids", `must name at most ${maxReportKeys} different keys`);
  }
  const sinceUs = requireTimestamp("since", req.since);
  const untilUs = optionalTimestamp("until", req.until);
  if (untilUs !== undefined && sinceUs > untilUs) throw invalidArgument("since", "must not be after until");
  let byKey = false;
  let byModel = false;
  for (const [i, grouping] of req.groupBy.entries()) {
    if (grouping === UsageGrouping.KEY) byKey = true;
    else if (grouping === UsageGrouping.MODEL) byModel = true;
    else throw invalidArgument(`group_by[${i}]`, "must be USAGE_GROUPING_KEY or USAGE_GROUPING_MODEL");
  }
  const width = widthOf(req.bucketWidth);
  const order = orderOf(req.orderBy);
  const shape = JSON.stringify([keyIds ?? null, String(sinceUs), String(untilUs ?? ""), width, byKey, byModel, order]);
  return { keyIds, sinceUs, untilUs, width, byKey, byModel, order, shape };
}

/** A report row as the contract gives it. */
export function reportRow(row: ReportRow): UsageReportRow {
  return create(UsageReportRowSchema, {
    bucketStart: timestampFromMicros(row.bucket_us),
    keyId: row.key_id ?? "",
    model: row.model ?? "",
    requestCount: row.request_count,
    // Beyond int64 (a spend of more than 2^63 cents): the nearest int64;
    // spend_cents_exact stays exact.
    spendCents: row.spend_cents ?? (row.spend_cents_exact.startsWith("-") ? minInt64 : maxInt64),
    spendCentsExact: row.spend_cents_exact,
  });
}

/** Where the page after `row` starts. */
export function reportPosition(row: ReportRow): ReportPosition {
  return {
    bucketUs: row.bucket_us,
    keyId: row.key_id ?? nilUuid,
    model: row.model ?? "",
    spendExact: row.spend_cents_exact,
  };
}

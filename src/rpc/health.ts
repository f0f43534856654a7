import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import {
  type Health,
  HealthCheckResponse_ServingStatus,
  HealthCheckResponseSchema,
} from "../../gen/grpc/health/v1/health_pb.js";
import { KeysDriverService } from "../../gen/keysdriver/v1/keys_driver_pb.js";

const knownServices = new Set(["", KeysDriverService.typeName]);

/**
 * The gRPC health service: SERVING while `serving()` says so (it turns false
 * when the server starts draining, so load balancers stop sending calls
 * before the connections close).
 */
export function createHealthService(serving: () => boolean) {
  return {
    async check(req) {
      if (!knownServices.has(req.service)) throw new ConnectError(`unknown service ${req.service}`, Code.NotFound);
      return create(HealthCheckResponseSchema, {
        status: serving() ? HealthCheckResponse_ServingStatus.SERVING : HealthCheckResponse_ServingStatus.NOT_SERVING,
      });
    },
    // biome-ignore lint/correctness/useYield: part of the protocol, not offered.
    async *watch() {
      throw new ConnectError("Health.Watch is not implemented; poll Health.Check", Code.Unimplemented);
    },
  } satisfies ServiceImpl<typeof Health>;
}

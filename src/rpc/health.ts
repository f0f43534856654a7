import { create } from "@bufbuild/protobuf";
import { Code, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  type Health,
  type HealthCheckResponse,
  HealthCheckResponseSchema,
  HealthCheckResponse_ServingStatus as ServingStatus,
} from "../../gen/grpc/health/v1/health_pb.js";
import { KeysDriverService } from "../../gen/keysdriver/v1/keys_driver_pb.js";
import { rpcError } from "../errors.js";

const knownServices = new Set(["", KeysDriverService.typeName]);

/**
 * Whether the service can serve: not while it drains before stopping, nor
 * while its database cannot be reached (src/db/probe.ts says which). One
 * status for "" (the whole server) and for KeysDriverService, which is all
 * it serves.
 */
export class HealthState {
  private databaseReachable = true;
  private draining = false;
  private readonly watchers = new Set<() => void>();

  get serving(): boolean {
    return this.databaseReachable && !this.draining;
  }

  /** Why it is not serving, for /readyz; undefined while serving. */
  get problem(): string | undefined {
    if (this.draining) return "draining";
    return this.databaseReachable ? undefined : "database unreachable";
  }

  setDatabaseReachable(reachable: boolean): void {
    if (reachable === this.databaseReachable) return;
    this.databaseReachable = reachable;
    this.changed();
  }

  /** The server is stopping: NOT_SERVING from now on, and Watch streams end once they have said so. */
  drain(): void {
    if (this.draining) return;
    this.draining = true;
    this.changed();
  }

  private changed(): void {
    for (const wake of this.watchers) wake();
  }

  /** Resolves at the next change, or when `signal` aborts. */
  nextChange(signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.watchers.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      this.watchers.add(done);
      signal.addEventListener("abort", done, { once: true });
    });
  }

  get isDraining(): boolean {
    return this.draining;
  }
}

/**
 * The gRPC health service over `state`: Check, and Watch, which sends the
 * status at once and again whenever it changes (SERVICE_UNKNOWN for a
 * service this server does not have, as the protocol asks), and ends after
 * saying NOT_SERVING when the server drains, so that it holds up no
 * shutdown. Kubernetes' gRPC probe and gRPC clients' health checking use it.
 */
export function createHealthService(state: HealthState) {
  const statusOf = (service: string): ServingStatus => {
    if (!knownServices.has(service)) return ServingStatus.SERVICE_UNKNOWN;
    return state.serving ? ServingStatus.SERVING : ServingStatus.NOT_SERVING;
  };
  return {
    async check(req) {
      if (!knownServices.has(req.service))
        throw rpcError(Code.NotFound, `unknown service ${req.service}`, { reason: "SERVICE_NOT_FOUND" });
      return create(HealthCheckResponseSchema, { status: statusOf(req.service) });
    },
    async *watch(req, context: HandlerContext): AsyncGenerator<HealthCheckResponse> {
      let sent: ServingStatus | undefined;
      for (;;) {
        const changed = state.nextChange(context.signal);
        const status = statusOf(req.service);
        if (status !== sent) {
          yield create(HealthCheckResponseSchema, { status });
          sent = status;
        }
        if (state.isDraining || context.signal.aborted) return;
        await changed;
      }
    },
  } satisfies ServiceImpl<typeof Health>;
}

import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, type HandlerContext } from "@connectrpc/connect";
import { rpcError } from "../errors.js";
import { callerIdentityKey, identityOf, tlsPeerKey } from "./caller.js";

/**
 * Mutual TLS and the per-method policy: which caller may call which rpc.
 * A caller is named by its certificate (a SPIFFE URI or a DNS name); the
 * policy file (AUTH_POLICY_FILE, JSON) lists, per name, the rpcs it may
 * call and whether it may ask for every tenant at once:
 *
 *     { "callers": [
 *         { "identity": "spiffe://platform.internal/gateway",
 *           "methods": ["FetchKeyById", "WatchKeys"], "allTenants": true },
 *         { "identity": "console.platform.internal", "methods": ["*"] } ] }
 */

/** One caller's permissions. */
interface Grant {
  /** Rpc names (KeysDriverService's), or every one. */
  readonly methods: ReadonlySet<string> | "all";
  /** May send a request with all_tenants set (WatchKeys for the whole platform). */
  readonly allTenants: boolean;
}

/** A parsed policy: the grants by identity. */
export class AccessPolicy {
  private constructor(private readonly grants: ReadonlyMap<string, Grant>) {}

  /**
   * Reads a policy file's text. `services` are the services whose rpcs it
   * may name; a name that is not one of their rpcs is an error, so that a
   * typo cannot silently deny (or, with "*", grant) what was meant.
   */
  static parse(text: string, services: readonly DescService[]): AccessPolicy {
    const known = new Set(services.flatMap((s) => s.methods.map((m) => m.name)));
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch (err) {
      throw new PolicyError(`is not JSON (${(err as Error).message})`);
    }
    const callers = (doc as { callers?: unknown } | null)?.callers;
    if (!Array.isArray(callers)) throw new PolicyError('must be an object with a "callers" array');
    const grants = new Map<string, Grant>();
    callers.forEach((entry: unknown, i) => {
      const where = `callers[${i}]`;
      const { identity, methods, allTenants, ...rest } = (entry ?? {}) as Record<string, unknown>;
      const unknownFields = Object.keys(rest);
      if (unknownFields.length > 0) throw new PolicyError(`${where} has unknown field "${unknownFields[0]}"`);
      if (typeof identity !== "string" || identity === "")
        throw new PolicyError(`${where}.identity must be a non-empty string`);
      // DNS names are case-insensitive; a certificate's is compared in lower case.
      const key = identity.includes(":") ? identity : identity.toLowerCase();
      if (grants.has(key)) throw new PolicyError(`${where}.identity "${identity}" is listed twice`);
      if (!Array.isArray(methods) || methods.some((m) => typeof m !== "string"))
        throw new PolicyError(`${where}.methods must be an array of rpc names (or "*")`);
      for (const m of methods as string[]) {
        if (m !== "*" && !known.has(m))
          throw new PolicyError(`${where}.methods names "${m}", which is not an rpc (${[...known].join(", ")})`);
      }
      if (allTenants !== undefined && typeof allTenants !== "boolean")
        throw new PolicyError(`${where}.allTenants must be true or false`);
      grants.set(key, {
        methods: (methods as string[]).includes("*") ? "all" : new Set(methods as string[]),
        allTenants: allTenants === true,
      });
    });
    return new AccessPolicy(grants);
  }

  /** The grant of a caller's identity, if the policy lists it. */
  grantOf(identity: string): Grant | undefined {
    return this.grants.get(identity);
  }
}

/** A policy file that cannot be used; the message completes "AUTH_POLICY_FILE ...". */
export class PolicyError extends Error {
  constructor(problem: string) {
    super(problem);
    this.name = "PolicyError";
  }
}

/** A request that asks for every tenant at once (WatchKeys' all_tenants). */
function asksForAllTenants(request: unknown): boolean {
  return (request as { allTenants?: unknown } | null)?.allTenants === true;
}

const certificateRequired = () =>
  rpcError(
    Code.Unauthenticated,
    "this service requires a TLS client certificate issued by its trusted CA; none was presented, or it did not verify",
    { reason: "CLIENT_CERTIFICATE_REQUIRED" },
  );

/**
 * The access check run before every call of the service (src/interceptors.ts):
 * UNAUTHENTICATED without a verified client certificate, PERMISSION_DENIED
 * for an rpc (or an all-tenants request) the policy does not grant the
 * caller. Without a policy, every verified certificate may call everything.
 * The policy can be replaced while the service runs (the reload).
 */
export class AccessControl {
  /** Counts the policy's replacements: an open stream is checked again after one. */
  generation = 0;

  constructor(private policy: AccessPolicy | undefined) {}

  replacePolicy(policy: AccessPolicy): void {
    this.policy = policy;
    this.generation++;
  }

  /** Checks the call; the caller's identity is left in the context for the handler (the actor of a freeze). */
  check(method: DescMethod, context: HandlerContext | undefined, request: unknown): void {
    const peer = context?.values.get(tlsPeerKey);
    if (!peer?.authorized) throw certificateRequired();
    const identity = identityOf(peer.certificate());
    this.authorize(method, identity, request);
    if (identity !== undefined) context?.values.set(callerIdentityKey, identity);
  }

  /** Throws PERMISSION_DENIED unless the policy in force grants `identity` this call. */
  private authorize(method: DescMethod, identity: string | undefined, request: unknown): void {
    const policy = this.policy;
    if (!policy) return;
    const grant = identity === undefined ? undefined : policy.grantOf(identity);
    const name = identity ?? "a certificate with no URI or DNS name";
    if (!grant || (grant.methods !== "all" && !grant.methods.has(method.name))) {
      throw rpcError(Code.PermissionDenied, `${name} may not call ${method.name} (AUTH_POLICY_FILE)`, {
        reason: "METHOD_NOT_ALLOWED",
        metadata: { method: method.name, identity: identity ?? "" },
      });
    }
    if (!grant.allTenants && asksForAllTenants(request)) {
      throw rpcError(
        Code.PermissionDenied,
        `${name} may not ask for every tenant at once (allTenants in AUTH_POLICY_FILE)`,
        { reason: "ALL_TENANTS_NOT_ALLOWED", metadata: { method: method.name, identity: name } },
      );
    }
  }
}

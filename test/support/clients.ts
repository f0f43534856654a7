import path from "node:path";
import {
  create,
  type DescMessage,
  fromBinary,
  fromJson,
  type JsonObject,
  type JsonValue,
  type MessageShape,
  toBinary,
  toJson,
} from "@bufbuild/protobuf";
import { TimestampSchema } from "@bufbuild/protobuf/wkt";
import { type Client, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { KeysDriverService } from "../../gen/keysdriver/v1/keys_driver_pb.js";

/** A length-delimited protobuf field holding a short string, for hand-built request bodies. */
export function stringField(number: number, value: string): Buffer {
  const bytes = Buffer.from(value);
  return Buffer.concat([Buffer.from([(number << 3) | 2, bytes.length]), bytes]);
}

/** The RpcError a call fails with; fails the test if it succeeds. */
export async function failure(promise: Promise<unknown>): Promise<RpcError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof RpcError) return err;
    throw err;
  }
  throw new Error("expected the call to fail, but it succeeded");
}

/** A google.rpc detail as it arrived: its type name and its encoded message. */
export interface RawDetail {
  readonly type: string;
  readonly value: Uint8Array;
}

/** The status a call ended with when it did not succeed. */
export class RpcError extends Error {
  constructor(
    readonly code: number,
    readonly rawMessage: string,
    readonly details: readonly RawDetail[] = [],
  ) {
    super(`rpc failed with code ${code}: ${rawMessage}`);
  }

  /** The details of one type, decoded. */
  find<D extends DescMessage>(schema: D): MessageShape<D>[] {
    return this.details.filter((d) => d.type === schema.typeName).map((d) => fromBinary(schema, d.value));
  }
}

/** The details of a grpc-status-details-bin trailer (a google.rpc.Status), as any gRPC client reads them. */
export function detailsOfStatus(bin: Uint8Array | undefined): RawDetail[] {
  if (!bin) return [];
  const status = fromBinary(StatusSchema, bin);
  return status.details.map((any) => ({ type: any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1), value: any.value }));
}

/**
 * A client that takes and returns messages in their canonical proto3 JSON
 * form (int64 as strings, timestamps as RFC 3339), so that tests can assert
 * exact values the same way whichever implementation made the call.
 */
export interface JsonCaller {
  readonly name: string;
  /** Calls a unary method, e.g. call("FetchKeyById", {...}), with a deadline or a cancel if given. */
  call(method: string, request: JsonObject, options?: CallOptions): Promise<JsonObject>;
  /** Reads a server stream to its end. */
  stream(method: string, request: JsonObject): Promise<JsonObject[]>;
  /** Opens a server stream, to be read one message at a time (nothing is read ahead). */
  open(method: string, request: JsonObject): OpenStream;
  close(): void;
}

/** A unary call's deadline (milliseconds from now) and cancel. */
export interface CallOptions {
  readonly timeoutMs?: number;
  readonly signal?: AbortSignal;
}

/** A server stream being read. */
export interface OpenStream {
  /**
   * The next message, or undefined when the stream ended. Throws RpcError
   * when the stream failed, and a plain Error after `waitMs` without one.
   */
  next(waitMs?: number): Promise<JsonObject | undefined>;
  /** Cancels the call. */
  cancel(): void;
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no message within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function methodOf(name: string) {
  const method = KeysDriverService.methods.find((m) => m.name === name);
  if (!method) throw new Error(`no method ${name}`);
  return method;
}

function asJson(schema: DescMessage, message: unknown): JsonObject {
  return toJson(schema, message as never) as JsonObject;
}

/** A caller through connect-node with the given transport. */
export function connectCaller(name: string, transport: Transport): JsonCaller {
  const client: Client<typeof KeysDriverService> = createClient(KeysDriverService, transport);
  const rethrow = (err: unknown): never => {
    if (err instanceof ConnectError) {
      const details = err.details.map((d) =>
        "desc" in d ? { type: d.desc.typeName, value: toBinary(d.desc, create(d.desc, d.value)) } : d,
      );
      throw new RpcError(err.code, err.rawMessage, details);
    }
    throw err;
  };
  return {
    name,
    async call(method, request, options) {
      const m = methodOf(method);
      const fn = client[m.localName as keyof typeof client] as (req: unknown, o?: CallOptions) => Promise<unknown>;
      try {
        return asJson(m.output, await fn(fromJson(m.input, request), options));
      } catch (err) {
        return rethrow(err);
      }
    },
    async stream(method, request) {
      const m = methodOf(method);
      const fn = client[m.localName as keyof typeof client] as (req: unknown) => AsyncIterable<unknown>;
      const out: JsonObject[] = [];
      try {
        for await (const res of fn(fromJson(m.input, request))) out.push(asJson(m.output, res));
      } catch (err) {
        rethrow(err);
      }
      return out;
    },
    open(method, request) {
      const m = methodOf(method);
      const fn = client[m.localName as keyof typeof client] as (
        req: unknown,
        options: { signal: AbortSignal },
      ) => AsyncIterable<unknown>;
      const abort = new AbortController();
      const iterator = fn(fromJson(m.input, request), { signal: abort.signal })[Symbol.asyncIterator]();
      let pending: Promise<IteratorResult<unknown>> | undefined;
      return {
        async next(waitMs = 10_000) {
          pending ??= iterator.next();
          try {
            const result = await withTimeout(pending, waitMs);
            pending = undefined;
            return result.done ? undefined : asJson(m.output, result.value);
          } catch (err) {
            if (!(err instanceof ConnectError)) throw err;
            pending = undefined;
            return rethrow(err);
          }
        },
        cancel() {
          abort.abort();
        },
      };
    },
    close() {},
  };
}

/** connect-node's gRPC transport over HTTP/2. */
export function connectGrpcCaller(address: string): JsonCaller {
  return connectCaller("connect-node gRPC", createGrpcTransport({ baseUrl: `http://${address}` }));
}

/** connect-node speaking the Connect protocol over HTTP/1.1. */
export function connectProtocolCaller(address: string): JsonCaller {
  return connectCaller(
    "connect-node Connect",
    createConnectTransport({ baseUrl: `http://${address}`, httpVersion: "1.1" }),
  );
}

/** connect-node speaking the Connect protocol over HTTP/2 (prior knowledge), as connect-go's and connect-kotlin's clients do. */
export function connectHttp2Caller(address: string): JsonCaller {
  return connectCaller(
    "connect-node Connect over HTTP/2",
    createConnectTransport({ baseUrl: `http://${address}`, httpVersion: "2" }),
  );
}

/** connect-node speaking gRPC-Web over HTTP/2. */
export function grpcWebHttp2Caller(address: string): JsonCaller {
  return connectCaller(
    "connect-node gRPC-Web over HTTP/2",
    createGrpcWebTransport({ baseUrl: `http://${address}`, httpVersion: "2" }),
  );
}

/** connect-node speaking gRPC-Web over HTTP/1.1. */
export function grpcWebCaller(address: string): JsonCaller {
  return connectCaller(
    "connect-node gRPC-Web",
    createGrpcWebTransport({ baseUrl: `http://${address}`, httpVersion: "1.1" }),
  );
}

// grpc-js with proto-loader decodes with protobufjs from the .proto file, an
// implementation independent of the server's protobuf-es. int64 arrives as a
// string and enums as names; timestamps are converted to RFC 3339 here.
const packageDefinition = protoLoader.loadSync(path.resolve("proto/keysdriver/v1/keys_driver.proto"), {
  includeDirs: [path.resolve("proto")],
  longs: String,
  enums: String,
  defaults: false,
  arrays: false,
  oneofs: true,
});
const loaded = grpc.loadPackageDefinition(packageDefinition) as unknown as {
  keysdriver: { v1: { KeysDriverService: grpc.ServiceClientConstructor } };
};

function isTimestamp(value: unknown): value is { seconds?: string; nanos?: number } {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const keys = Object.keys(value);
  return keys.length > 0 && keys.every((k) => k === "seconds" || k === "nanos");
}

// proto-loader's plain objects, normalised to proto3 JSON.
function normalise(value: unknown): JsonValue {
  if (Array.isArray(value)) return value.map(normalise);
  if (isTimestamp(value)) {
    const ts = create(TimestampSchema, { seconds: BigInt(value.seconds ?? "0"), nanos: value.nanos ?? 0 });
    return toJson(TimestampSchema, ts);
  }
  if (typeof value === "object" && value !== null) {
    const out: JsonObject = {};
    for (const [k, v] of Object.entries(value)) {
      if (v === undefined || v === null) continue;
      out[k] = normalise(v);
    }
    return out;
  }
  return value as JsonValue;
}

// Requests: RFC 3339 strings of Timestamp fields become {seconds, nanos}.
function requestFor(method: string, request: JsonObject): Record<string, unknown> {
  const m = methodOf(method);
  const out: Record<string, unknown> = { ...request };
  for (const field of m.input.fields) {
    const value = request[field.jsonName];
    if (field.message?.typeName === "google.protobuf.Timestamp" && typeof value === "string") {
      const ts = fromJson(TimestampSchema, value);
      out[field.jsonName] = { seconds: ts.seconds.toString(), nanos: ts.nanos };
    }
  }
  return out;
}

/** @grpc/grpc-js as an independent gRPC client; plaintext unless given TLS credentials. */
export function grpcJsCaller(
  address: string,
  credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
): JsonCaller {
  const client = new loaded.keysdriver.v1.KeysDriverService(address, credentials);
  const asRpcError = (err: grpc.ServiceError) =>
    new RpcError(err.code, err.details, detailsOfStatus(err.metadata?.get("grpc-status-details-bin")[0] as Buffer));
  type Unary = (
    req: unknown,
    metadata: grpc.Metadata,
    options: grpc.CallOptions,
    cb: (err: grpc.ServiceError | null, res: unknown) => void,
  ) => grpc.ClientUnaryCall;
  return {
    name: "@grpc/grpc-js",
    call(method, request, options) {
      const fn = (client[method] as Unary).bind(client);
      const deadline = options?.timeoutMs === undefined ? undefined : Date.now() + options.timeoutMs;
      return new Promise((resolve, reject) => {
        const call = fn(requestFor(method, request), new grpc.Metadata(), deadline ? { deadline } : {}, (err, res) => {
          if (err) reject(asRpcError(err));
          else resolve(normalise(res) as JsonObject);
        });
        options?.signal?.addEventListener("abort", () => call.cancel(), { once: true });
      });
    },
    stream(method, request) {
      const call = (client[method] as (req: unknown) => grpc.ClientReadableStream<unknown>).call(
        client,
        requestFor(method, request),
      );
      const out: JsonObject[] = [];
      return new Promise((resolve, reject) => {
        call.on("data", (res) => out.push(normalise(res) as JsonObject));
        call.on("error", (err: grpc.ServiceError) => reject(asRpcError(err)));
        call.on("end", () => resolve(out));
      });
    },
    open(method, request) {
      const call = (client[method] as (req: unknown) => grpc.ClientReadableStream<unknown>).call(
        client,
        requestFor(method, request),
      );
      // Paused between reads, so that nothing is read ahead of the test.
      call.pause();
      const queue: JsonObject[] = [];
      let ended = false;
      let failure: RpcError | undefined;
      let wake: (() => void) | undefined;
      call.on("data", (res) => {
        queue.push(normalise(res) as JsonObject);
        call.pause();
        wake?.();
      });
      call.on("error", (err: grpc.ServiceError) => {
        failure = asRpcError(err);
        wake?.();
      });
      call.on("end", () => {
        ended = true;
        wake?.();
      });
      return {
        async next(waitMs = 10_000) {
          if (queue.length === 0 && !ended && !failure) {
            const arrived = new Promise<void>((resolve) => {
              wake = resolve;
            });
            call.resume();
            await withTimeout(arrived, waitMs);
            wake = undefined;
          }
          const message = queue.shift();
          if (message) return message;
          if (failure) throw failure;
          return undefined;
        },
        cancel() {
          call.cancel();
        },
      };
    },
    close() {
      client.close();
    },
  };
}

import type http2 from "node:http2";
import type { DescMessage, DescMethod, DescService, MessageShape } from "@bufbuild/protobuf";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import {
  type Code,
  ConnectError,
  type ContextValues,
  createContextValues,
  type HandlerContext,
} from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import * as serverInterceptors from "@grpc/grpc-js/build/src/server-interceptors.js";
import { StatusSchema } from "../../gen/google/rpc/status_pb.js";
import { callStatements, type StatementScope } from "../db/client.js";
import { invalidArgument, withErrorDetails } from "../errors.js";
import { type CallEndListener, clientCancelled, deadlinePassed, onCallEnd } from "../interceptors.js";
import { tlsPeerKey } from "../security/caller.js";
import { malformedRequest } from "./malformed.js";

type UnaryHandler = (req: never, context: HandlerContext) => Promise<unknown>;
type StreamHandler = (req: never, context: HandlerContext) => AsyncIterable<unknown>;

// A body that does not decode is handed on as a marker, answered
// INVALID_ARGUMENT by the handler's wrapper (grpc-js itself would answer INTERNAL).
function deserializer<D extends DescMessage>(schema: D) {
  return (bytes: Buffer): MessageShape<D> => {
    try {
      return fromBinary(schema, bytes);
    } catch (err) {
      return malformedRequest(err instanceof Error ? err.message : String(err)) as MessageShape<D>;
    }
  };
}

// grpc-js wants a Buffer; this one shares toBinary's memory rather than copying it.
function serializer<D extends DescMessage>(schema: D) {
  return (message: MessageShape<D>): Buffer => {
    const bytes = toBinary(schema, message);
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };
}

// A server stream's message is often the very same object sent on many
// streams (a change fanned out to every watcher): encoded once.
function sharedSerializer<D extends DescMessage>(schema: D) {
  const encode = serializer(schema);
  const encoded = new WeakMap<object, Buffer>();
  return (message: MessageShape<D>): Buffer => {
    let bytes = encoded.get(message);
    if (!bytes) {
      bytes = encode(message);
      encoded.set(message, bytes);
    }
    return bytes;
  };
}

// Handlers reach this point wrapped (src/interceptors.ts), so what they
// throw is already the ConnectError for the caller. connect's Code numbers
// are gRPC's status codes; the message goes out as the status details text
// and the google.rpc details in grpc-status-details-bin.
function toServiceError(err: unknown): Partial<grpc.ServiceError> {
  const error = withErrorDetails(ConnectError.from(err));
  return { code: error.code as number as grpc.status, details: error.rawMessage, metadata: statusMetadata(error) };
}

const statusDetailsKey = "grpc-status-details-bin";

/**
 * The headers of a trailers-only gRPC response with `error`'s status and
 * details: an answer written straight onto an HTTP/2 stream, without a
 * grpc-js call (the refusals of an overloaded process, src/server.ts).
 */
export function trailersOnlyResponse(error: ConnectError): http2.OutgoingHttpHeaders {
  const withDetails = withErrorDetails(error);
  return {
    ":status": 200,
    "content-type": "application/grpc+proto",
    "grpc-status": String(withDetails.code),
    "grpc-message": encodeURIComponent(withDetails.rawMessage),
    [statusDetailsKey]: Buffer.from(statusMetadata(withDetails).get(statusDetailsKey)[0] as Buffer).toString("base64"),
  };
}

function statusMetadata(error: ConnectError): grpc.Metadata {
  const status = create(StatusSchema, {
    code: error.code,
    message: error.rawMessage,
    details: error.details.map((d) =>
      "desc" in d
        ? anyPack(d.desc, create(d.desc, d.value))
        : { typeUrl: `type.googleapis.com/${d.type}`, value: d.value },
    ),
  });
  const metadata = new grpc.Metadata();
  metadata.set(statusDetailsKey, Buffer.from(toBinary(StatusSchema, status)));
  return metadata;
}

// Two of the caller's mistakes that grpc-js answers INTERNAL (as grpc-go
// does); the other protocols say INVALID_ARGUMENT, and so does this server.
const callerMistakes: [RegExp, string][] = [
  [/^Invalid grpc-timeout value/, "grpc-timeout"],
  [/^Failed to decompress message/, ""],
];

// A status grpc-js made itself, with the details every error carries added.
function withStatusDetails<S extends { code: grpc.status; details?: string; metadata?: grpc.Metadata | null }>(
  status: S,
): S {
  if (status.code === grpc.status.OK || status.metadata?.get(statusDetailsKey).length) return status;
  const text = status.details ?? "";
  const mistake = status.code === grpc.status.INTERNAL ? callerMistakes.find(([p]) => p.test(text)) : undefined;
  if (mistake) {
    const error = invalidArgument(mistake[1], text, mistake[1] === "" ? "MALFORMED_REQUEST" : "INVALID_HEADER");
    const metadata = status.metadata?.clone() ?? new grpc.Metadata();
    metadata.merge(statusMetadata(withErrorDetails(error)));
    return { ...status, code: grpc.status.INVALID_ARGUMENT, details: error.rawMessage, metadata };
  }
  const error = withErrorDetails(new ConnectError(text, status.code as number as Code));
  const metadata = status.metadata?.clone() ?? new grpc.Metadata();
  metadata.merge(statusMetadata(error));
  return { ...status, metadata };
}

// grpc-js answers some calls itself, never reaching a handler: a message over
// the size limit, a deadline that passes first, a body it cannot decompress
// (all through its call object's sendStatus), an unknown method (through its
// server's _respondWithError). There, a status without details gets the ones
// every error carries.
function addDetailsToEveryStatus(): void {
  const targets = [
    [serverInterceptors.BaseServerInterceptingCall?.prototype, "sendStatus"],
    [grpc.Server.prototype, "_respondWithError"],
  ] as const;
  for (const [target, name] of targets) {
    const methods = target as unknown as Record<string, unknown> | undefined;
    const original = methods?.[name];
    if (!methods || typeof original !== "function") {
      throw new Error(`@grpc/grpc-js changed: ${name}, which src/transport/grpc.ts wraps, is gone`);
    }
    if ((original as { withDetails?: true }).withDetails) continue;
    // sendStatus(status), _respondWithError(status, stream, channelzSessionInfo)
    const wrapped = function (this: unknown, status: grpc.StatusObject, second: unknown, third: unknown) {
      return original.call(this, withStatusDetails(status), second, third);
    };
    methods[name] = Object.assign(wrapped, { withDetails: true as const });
  }
}
addDetailsToEveryStatus();

/**
 * A server-streaming handler served by grpc-js: the handler gets a context
 * whose signal aborts when the client cancels or its deadline passes, and
 * it is read only as fast as the client takes its messages (a full buffer
 * waits for "drain"), so a slow client slows the handler, not memory.
 */
function serverStream(service: DescService, method: DescMethod, handler: StreamHandler) {
  return (call: grpc.ServerWritableStream<unknown, unknown>) => {
    const { context, done: ended } = callContext(service, method, call);
    const cancelled = context.signal;
    const drained = () =>
      new Promise<void>((resolve) => {
        const done = () => {
          call.off("drain", done);
          cancelled.removeEventListener("abort", done);
          resolve();
        };
        call.on("drain", done);
        cancelled.addEventListener("abort", done, { once: true });
      });
    (async () => {
      try {
        for await (const message of handler(call.request as never, context)) {
          if (cancelled.aborted) break;
          if (!call.write(message)) await drained();
        }
        if (!cancelled.aborted) call.end();
      } catch (err) {
        if (!cancelled.aborted) call.emit("error", toServiceError(err));
      } finally {
        ended();
      }
    })();
  };
}

/** A call's metadata as Headers (its text entries; binary ones stay in the metadata). */
function requestHeaders(metadata: grpc.Metadata): Headers {
  const headers = new Headers();
  for (const [name, value] of Object.entries(metadata.getMap())) {
    try {
      if (typeof value === "string") headers.set(name, value);
    } catch {
      // A value Headers refuses is left out; the call does not depend on it.
    }
  }
  return headers;
}

/**
 * The context of a grpc-js call: its signal aborts when the client
 * cancels or the deadline passes. Built by hand rather than with
 * createHandlerContext, which costs about 45 µs a call (three WHATWG
 * Headers and linked abort signals, measured with the benchmark's
 * Health.Check); the headers and context values no handler here reads are
 * made only if something asks for them. A class, so that a call makes one
 * object and one closure (its cancel listener), not a closure per accessor.
 */
class GrpcCallContext {
  readonly protocolName = "grpc";
  readonly requestMethod = "POST";
  private ended: ConnectError | undefined;
  private controller: AbortController | undefined;
  private listeners: CallEndListener[] | undefined;
  private headers: { request: Headers; response: Headers; trailer: Headers } | undefined;
  private contextValues: ContextValues | undefined;
  /** Set when the handler is run (src/interceptors.ts); declared so every context has one shape. */
  [callStatements]: StatementScope | undefined = undefined;
  private readonly deadlineAt: number;
  private readonly timer: NodeJS.Timeout | undefined;
  private readonly cancelled: () => void;

  constructor(
    readonly service: DescService,
    readonly method: DescMethod,
    private readonly call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>,
  ) {
    const deadline = call.getDeadline();
    this.deadlineAt = typeof deadline === "number" ? deadline : deadline.getTime();
    // A timer cannot wait longer than 2^31-1 ms; grpc-js passes such deadlines on.
    this.timer = Number.isFinite(this.deadlineAt)
      ? setTimeout(endByDeadline, Math.min(Math.max(0, this.deadlineAt - Date.now()), 2 ** 31 - 1), this)
      : undefined;
    this.cancelled = () => this.end(clientCancelled());
    // on, not once (which wraps the listener): done() takes it off.
    call.on("cancelled", this.cancelled);
  }

  /** Ends the call early: the handler is told through onCallEnd, and the signal if anything read it. */
  end(reason: ConnectError): void {
    if (this.ended) return;
    this.ended = reason;
    this.controller?.abort(reason);
    for (const listener of this.listeners ?? []) listener.callEnded(reason);
  }

  /** The call is over: its timer and listener go. */
  done(): void {
    clearTimeout(this.timer);
    this.call.off("cancelled", this.cancelled);
  }

  get url(): string {
    return `/${this.service.typeName}/${this.method.name}`;
  }
  get peer() {
    return { addr: this.call.getPeer() };
  }
  get signal(): AbortSignal {
    if (!this.controller) {
      this.controller = new AbortController();
      if (this.ended) this.controller.abort(this.ended);
    }
    return this.controller.signal;
  }
  timeoutMs(): number | undefined {
    return Number.isFinite(this.deadlineAt) ? this.deadlineAt - Date.now() : undefined;
  }
  private lazyHeaders() {
    this.headers ??= { request: requestHeaders(this.call.metadata), response: new Headers(), trailer: new Headers() };
    return this.headers;
  }
  get requestHeader(): Headers {
    return this.lazyHeaders().request;
  }
  get responseHeader(): Headers {
    return this.lazyHeaders().response;
  }
  get responseTrailer(): Headers {
    return this.lazyHeaders().trailer;
  }
  get values(): ContextValues {
    if (!this.contextValues) {
      // grpc-js gives a certificate only when it chains to the client CA.
      const certificate = this.call.getAuthContext().sslPeerCertificate;
      const peer = certificate ? { authorized: true, certificate: () => certificate } : undefined;
      this.contextValues = createContextValues().set(tlsPeerKey, peer);
    }
    return this.contextValues;
  }
  [onCallEnd](listener: CallEndListener): void {
    if (this.ended) {
      listener.callEnded(this.ended);
      return;
    }
    this.listeners ??= [];
    this.listeners.push(listener);
  }
}

function endByDeadline(context: GrpcCallContext): void {
  context.end(deadlinePassed());
}

function callContext(
  service: DescService,
  method: DescMethod,
  call: grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>,
) {
  const context = new GrpcCallContext(service, method, call);
  return { context: context as unknown as HandlerContext, done: () => context.done() };
}

/** A unary handler served by grpc-js, with the call's context (deadline, cancel). */
function unaryCall(service: DescService, method: DescMethod, handler: UnaryHandler) {
  return (call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
    const context = new GrpcCallContext(service, method, call);
    handler(call.request as never, context as unknown as HandlerContext).then(
      (response) => {
        context.done();
        callback(null, response);
      },
      (err: unknown) => {
        context.done();
        callback(toServiceError(err));
      },
    );
  };
}

/**
 * The grpc-js service definition and implementation for `service`, with
 * protobuf-es doing the (de)serialising and `handlers` (the same functions
 * the Connect routes call) doing the work. Streaming methods without a
 * handler that grpc-js can call answer UNIMPLEMENTED.
 */
export function grpcServiceFor(
  service: DescService,
  handlers: Record<string, unknown>,
): { definition: grpc.ServiceDefinition; implementation: grpc.UntypedServiceImplementation } {
  const definition: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  const implementation: grpc.UntypedServiceImplementation = {};
  for (const method of service.methods) {
    definition[method.localName] = {
      path: `/${service.typeName}/${method.name}`,
      requestStream: method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
      responseStream: method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
      requestSerialize: serializer(method.input) as (message: unknown) => Buffer,
      requestDeserialize: deserializer(method.input),
      responseSerialize: (method.methodKind === "server_streaming"
        ? sharedSerializer(method.output)
        : serializer(method.output)) as (message: unknown) => Buffer,
      responseDeserialize: deserializer(method.output),
      originalName: method.localName,
    };
    const handler = handlers[method.localName];
    if (method.methodKind === "unary" && handler) {
      implementation[method.localName] = unaryCall(service, method, handler as UnaryHandler);
    } else if (method.methodKind === "server_streaming" && handler) {
      implementation[method.localName] = serverStream(service, method, handler as StreamHandler);
    } else {
      implementation[method.localName] = (call: grpc.ServerWritableStream<unknown, unknown>) => {
        call.emit("error", { code: grpc.status.UNIMPLEMENTED, details: `${method.name} is not implemented yet` });
      };
    }
  }
  return { definition, implementation };
}

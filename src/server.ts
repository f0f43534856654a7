import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { type ConnectRouter, createContextValues, type ServiceImpl } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { type ConnectionLimits, defaultConnectionLimits, StartError } from "./config.js";
import { CallAdmission, type CallObservers, observeCalls, overloaded } from "./interceptors.js";
import { createHealthService, type HealthState } from "./rpc/health.js";
import { addReflection } from "./rpc/reflection.js";
import { tlsPeerKey, tlsPeerOfSocket } from "./security/caller.js";
import type { TlsMaterial } from "./security/tls.js";
import { grpcServiceFor, trailersOnlyResponse } from "./transport/grpc.js";
import { assertConnectFixed } from "./transport/malformed.js";

/** A service and its handlers, to be served. */
export interface ServiceRegistration<S extends DescService = DescService> {
  readonly service: S;
  readonly impl: Partial<ServiceImpl<S>>;
}

/** Pairs a service with its handlers, checking their types against each other. */
export function registration<S extends DescService>(service: S, impl: Partial<ServiceImpl<S>>): ServiceRegistration {
  return { service, impl } as ServiceRegistration;
}

/** What startServer needs. */
export interface ServerDeps {
  /** The services to serve; the gRPC health service is added to them. */
  readonly services: readonly ServiceRegistration[];
  /** Applied around every handler of every service (src/interceptors.ts). */
  readonly observers: CallObservers;
  /** Interface to listen on, e.g. "127.0.0.1". */
  readonly host: string;
  /** TCP port; 0 picks a free one. */
  readonly port: number;
  /** Connection limits; defaultConnectionLimits for what is not given. */
  readonly limits?: Partial<ConnectionLimits>;
  /** Whether to answer SERVING (Health, /readyz); startServer marks it draining when it closes. */
  readonly health: HealthState;
  /** The Prometheus text for GET /metrics; without it, /metrics is 404. */
  readonly metricsText?: () => Promise<string>;
  /** Serve TLS (and ask for client certificates when it says so); plaintext without it. */
  readonly tls?: TlsMaterial;
}

/** A listening server. */
export interface RunningServer {
  /** The port it listens on (the real one when 0 was asked for). */
  readonly port: number;
  /** "host:port", for clients. */
  readonly address: string;
  /** New connections use this certificate, key and client CA (a reload); open ones keep theirs. */
  setTls(material: TlsMaterial): void;
  /**
   * Stops accepting connections, lets calls in flight finish for up to
   * `graceMs`, then cuts what is left. Resolves when everything is closed.
   */
  close(graceMs?: number): Promise<void>;
}

// Every HTTP/2 connection without TLS opens with this preface; an HTTP/1.x
// request never starts with "PRI".
const http2Preface = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/**
 * The largest request message either server accepts, measured after
 * decompression (gRPC's and grpc-go's default). The largest real request, a
 * WatchKeys with 1,000 key ids, is about 40 KB; without the limit, Connect
 * and gRPC-Web would accept up to 4 GiB, and a small gzip body could grow
 * the process by gigabytes.
 */
export const maxRequestBytes = 4 * 1024 * 1024;

/** HTTP/1.1: the request's headers must have arrived by then, and the whole request by the second. */
const headersTimeoutMs = 10_000;
const requestTimeoutMs = 60_000;

/**
 * connect-es turns a caller's timeout into a timer, and Node runs a timer
 * longer than 2^31-1 ms (about 24.8 days) after 1 ms: a valid timeout of a
 * month would end the call at once. Longer timeouts are cut to that.
 */
const longestTimeoutMs = 2 ** 31 - 1;
const grpcTimeoutUnits: Record<string, number> = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 0.001, n: 0.000001 };

function clampTimeouts(headers: http.IncomingHttpHeaders): void {
  const connect = headers["connect-timeout-ms"];
  if (typeof connect === "string" && /^\d+$/.test(connect) && Number(connect) > longestTimeoutMs) {
    headers["connect-timeout-ms"] = String(longestTimeoutMs);
  }
  const grpc = headers["grpc-timeout"];
  const parsed = typeof grpc === "string" ? /^(\d{1,8})([HMSmun])$/.exec(grpc) : null;
  if (parsed && Number(parsed[1]) * (grpcTimeoutUnits[parsed[2] as string] ?? 0) > longestTimeoutMs) {
    headers["grpc-timeout"] = `${Math.floor(longestTimeoutMs / 1000)}S`;
  }
}

/**
 * connect-node refuses a request body over the size limit before reading it
 * all, and stops reading by destroying the request, which resets the
 * socket. An answer sent before its request was read whole therefore says
 * `Connection: close`: a client must not send its next request on that
 * connection (it would fail with ECONNRESET).
 */
function closeIfAnsweredUnread(req: http.IncomingMessage, res: http.ServerResponse): void {
  const writeHead = res.writeHead;
  res.writeHead = function (this: http.ServerResponse, ...args: Parameters<typeof writeHead>) {
    if (!req.complete) this.setHeader("connection", "close");
    return writeHead.apply(this, args);
  } as typeof writeHead;
}

type HttpResponse = http.ServerResponse | http2.Http2ServerResponse;

/**
 * The gRPC protocol with protobuf messages, which grpc-js serves. gRPC-Web
 * ("application/grpc-web…") and gRPC with JSON messages
 * ("application/grpc+json") are connect-node's.
 */
function isGrpc(contentType: string | undefined): boolean {
  if (contentType === undefined || !contentType.startsWith("application/grpc")) return false;
  const rest = contentType.slice("application/grpc".length);
  return rest === "" || rest.startsWith("+proto") || rest.startsWith(";");
}

/**
 * grpc-js owns every HTTP/2 connection (it is the fast path for gRPC), but a
 * connect-go, connect-kotlin or connect-swift client speaks the Connect
 * protocol over HTTP/2 too, as browsers' gRPC-Web can. grpc-js checks each
 * stream's content type before anything else (after counting the stream for
 * its idle timeout) and answers 415 to what is not gRPC; here, that check
 * hands every other stream to `serve` (connect-node) as a request of Node's
 * HTTP/2 compatibility API, built the way Node's own HTTP/2 server does. The
 * split is per request, so one connection can carry both.
 */
function serveNonGrpcStreams(
  server: grpc.Server,
  serve: (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void,
  refuse: (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => boolean,
): void {
  const check = server as unknown as {
    _verifyContentType?: (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => boolean;
  };
  if (typeof check._verifyContentType !== "function") {
    throw new Error("@grpc/grpc-js changed: Server._verifyContentType, which src/server.ts replaces, is gone");
  }
  check._verifyContentType = (stream, headers) => {
    if (isGrpc(headers["content-type"])) return !refuse(stream, headers);
    const rawHeaders = Object.entries(headers).flatMap(([name, value]) =>
      Array.isArray(value) ? value.flatMap((v) => [name, v]) : [name, String(value)],
    );
    serve(new http2.Http2ServerRequest(stream, headers, {}, rawHeaders), new http2.Http2ServerResponse(stream));
    return false;
  };
}

/** How often an overloaded process says how many calls it refused. */
const refusalReportMs = 10_000;

/**
 * The refusal of a gRPC call that the cap on calls in flight would refuse
 * anyway, made before grpc-js reads it: a trailers-only RESOURCE_EXHAUSTED
 * (reason OVERLOADED, RetryInfo) written straight onto the stream, counted
 * in the metrics, and logged as a count every 10 s rather than a line per
 * call. Under overload, refusals are most of the calls: this way one costs
 * less than half the CPU of a refusal through grpc-js and the call wrapper
 * (docs/DESIGN.md, "Overload and faults").
 */
function refuseWhenFull(deps: ServerDeps, admission: CallAdmission) {
  const capped = new Map<string, DescMethod>();
  for (const { service } of deps.services) {
    for (const method of service.methods) {
      if (method.methodKind === "unary") capped.set(`/${service.typeName}/${method.name}`, method);
    }
  }
  const headers = trailersOnlyResponse(overloaded(admission.limit));
  let refused = 0;
  let reportedAt = 0;
  return (stream: http2.ServerHttp2Stream, requestHeaders: http2.IncomingHttpHeaders): boolean => {
    if (!admission.full) return false;
    const method = capped.get(requestHeaders[":path"] ?? "");
    if (!method) return false;
    // Answered once the request has arrived (its body discarded): an answer
    // that ends the stream first makes the rest of the request frames on a
    // closed stream, which Node's HTTP/2 counts against the connection
    // (maxSessionInvalidFrames) until it closes it.
    const answer = () => {
      if (!stream.destroyed && !stream.headersSent) stream.respond({ ...headers }, { endStream: true });
    };
    if (stream.readableEnded) answer();
    else stream.once("end", answer);
    // A body larger than any request may be is not waited for.
    let received = 0;
    stream.on("data", (chunk: Buffer) => {
      received += chunk.length;
      if (received > maxRequestBytes + 5) {
        answer();
        stream.close(http2.constants.NGHTTP2_CANCEL);
      }
    });
    deps.observers.metrics?.record(method, "RESOURCE_EXHAUSTED", 0);
    refused++;
    const now = Date.now();
    if (now - reportedAt >= refusalReportMs) {
      deps.observers.logger?.warn(
        { refused, limit: admission.limit },
        "overloaded: refused calls past MAX_CALLS_IN_FLIGHT (RESOURCE_EXHAUSTED)",
      );
      refused = 0;
      reportedAt = now;
    }
    return true;
  };
}

/** An HTTP/2 frame's header: a client's first SETTINGS frame follows the preface. */
const frameHeaderLength = 9;

/** A connection that has not sent enough to tell its protocol by then is closed. */
const firstBytesTimeoutMs = 10_000;

/**
 * Serves KeysDriverService on one port: HTTP/2 connections (h2c) go to a
 * grpc-js server, HTTP/1.1 connections (Connect and gRPC-Web) to
 * connect-node; on HTTP/2, the requests that are not gRPC (Connect,
 * gRPC-Web) are handed on to connect-node too. Both call the same handlers.
 * grpc-js serves gRPC at a fraction of connect-node's cost per call (see
 * docs/DESIGN.md).
 */
export async function startServer(deps: ServerDeps): Promise<RunningServer> {
  assertConnectFixed();
  const health = createHealthService(deps.health);
  // channelz keeps per-call statistics for a debugging service this server
  // does not offer; turning it off takes that bookkeeping off every call.
  const limits = { ...defaultConnectionLimits, ...deps.limits };
  const grpcServer = new grpc.Server({
    "grpc.enable_channelz": 0,
    "grpc.max_receive_message_length": maxRequestBytes,
    "grpc.max_concurrent_streams": limits.maxConcurrentStreams,
    "grpc.max_connection_idle_ms": limits.idleTimeoutMs,
    "grpc.keepalive_time_ms": limits.keepaliveTimeMs,
    "grpc.keepalive_timeout_ms": limits.keepaliveTimeoutMs,
    ...(limits.maxAgeMs > 0
      ? { "grpc.max_connection_age_ms": limits.maxAgeMs, "grpc.max_connection_age_grace_ms": limits.maxAgeGraceMs }
      : {}),
  });
  // Each service is registered with both servers in one place, with the
  // same wrapped handlers, so the protocols cannot drift apart.
  const connectRoutes: ((router: ConnectRouter) => void)[] = [];
  // The service's unary calls share one cap; health checks are never
  // refused, and need no client certificate (probes have none).
  const admission = new CallAdmission(limits.maxCallsInFlight);
  const admitted = { ...deps.observers, admission };
  const probes = { ...deps.observers, access: undefined };
  for (const { service, impl } of [...deps.services, registration(Health, health)]) {
    const handlers = observeCalls(service, impl, service === Health ? probes : admitted);
    const { definition, implementation } = grpcServiceFor(service, handlers);
    grpcServer.addService(definition, implementation);
    connectRoutes.push((router) => router.service(service, handlers));
  }
  addReflection(grpcServer, [...deps.services.map((s) => s.service.typeName), Health.typeName]);
  const grpcConnections = grpcServer.createConnectionInjector(grpc.ServerCredentials.createInsecure());
  const connectHandler = connectNodeAdapter({
    readMaxBytes: maxRequestBytes,
    // On TLS, the access check (src/security/access.ts) reads the caller's certificate from the socket.
    ...(deps.tls ? { contextValues: (req) => createContextValues().set(tlsPeerKey, tlsPeerOfSocket(req.socket)) } : {}),
    routes: (router) => {
      for (const route of connectRoutes) route(router);
    },
  });
  // Plain HTTP for probes and scrapers beside the rpcs: GET /livez (the
  // process answers), GET /readyz and /healthz (it can serve calls: not
  // while draining, nor while the database is out of reach), GET /metrics.
  // The rest is connect-node's: Connect and gRPC-Web, on HTTP/1.1 and HTTP/2.
  const serveHttp = (req: http.IncomingMessage | http2.Http2ServerRequest, res: HttpResponse) => {
    const path = req.url?.split("?")[0];
    if (req.method === "GET" && path === "/livez") {
      res.writeHead(200, { "content-type": "text/plain" }).end("ok\n");
    } else if (req.method === "GET" && (path === "/readyz" || path === "/healthz")) {
      const problem = deps.health.problem;
      res.writeHead(problem ? 503 : 200, { "content-type": "text/plain" }).end(`${problem ?? "ok"}\n`);
    } else if (req.method === "GET" && path === "/metrics" && deps.metricsText) {
      deps.metricsText().then(
        (text) => res.writeHead(200, { "content-type": "text/plain; version=0.0.4" }).end(text),
        (err: unknown) => {
          (deps.observers.logError ?? console.error)("metrics could not be gathered", err);
          res.writeHead(503, { "content-type": "text/plain" }).end("metrics unavailable\n");
        },
      );
    } else {
      clampTimeouts(req.headers);
      if (res instanceof http.ServerResponse) closeIfAnsweredUnread(req as http.IncomingMessage, res);
      connectHandler(req, res);
    }
  };
  const httpServer = http.createServer(
    { headersTimeout: headersTimeoutMs, requestTimeout: requestTimeoutMs, connectionsCheckingInterval: 1000 },
    serveHttp,
  );
  serveNonGrpcStreams(grpcServer, serveHttp, refuseWhenFull(deps, admission));

  // Node tracks an HTTP server's connections (for the header and request
  // timeouts above, closeIdleConnections and closeAllConnections) from the
  // moment it starts listening. This one never listens: its sockets come
  // from the listener below. Without this, those timeouts never fire and a
  // half-sent request holds up shutdown until the process gives up.
  httpServer.emit("listening");

  // Connections whose first bytes have not told their protocol yet. They
  // belong to neither server, so this one closes them: when they say
  // nothing for too long, and at shutdown.
  const undecided = new Set<net.Socket>();
  const http2Sockets = new Set<net.Socket>();
  // Sorts a connection by its first (decrypted, on TLS) bytes: ALPN h2 and
  // prior-knowledge h2c both open with the HTTP/2 preface.
  const accept = (socket: net.Socket) => {
    // TLS 1.2 lets a client renegotiate with another certificate on the same
    // connection, after which Node still reports the first handshake's
    // verdict for the new, unverified certificate: no renegotiation.
    if (socket instanceof tls.TLSSocket) socket.disableRenegotiation();
    socket.setNoDelay(true);
    undecided.add(socket);
    const silent = setTimeout(() => socket.destroy(), firstBytesTimeoutMs);
    silent.unref();
    let seen = Buffer.alloc(0);
    const route = () => {
      const chunk: Buffer | null = socket.read();
      if (chunk === null) return;
      seen = Buffer.concat([seen, chunk]);
      const compared = Math.min(seen.length, http2Preface.length);
      const isHttp2 = seen.subarray(0, compared).equals(http2Preface.subarray(0, compared));
      if (isHttp2 && seen.length < http2Preface.length) return; // wait for the rest of the preface
      socket.off("readable", route);
      clearTimeout(silent);
      undecided.delete(socket);
      socket.unshift(seen);
      if (isHttp2) {
        // grpc-js closes what it knows: a session that has begun. One
        // that sent the preface and nothing more is this server's to close,
        // after the same time, and at shutdown.
        http2Sockets.add(socket);
        const handshake = setTimeout(() => {
          if (socket.bytesRead < http2Preface.length + frameHeaderLength) socket.destroy();
        }, firstBytesTimeoutMs);
        handshake.unref();
        socket.once("close", () => {
          clearTimeout(handshake);
          http2Sockets.delete(socket);
        });
        grpcConnections.injectConnection(socket);
      } else {
        httpServer.emit("connection", socket);
      }
    };
    socket.on("readable", route);
    socket.on("error", () => socket.destroy());
    socket.on("close", () => {
      clearTimeout(silent);
      undecided.delete(socket);
    });
  };
  const listener = deps.tls
    ? tls.createServer(
        {
          ...deps.tls.options,
          ALPNProtocols: ["h2", "http/1.1"],
          // Mutual TLS: a client without a valid certificate still connects,
          // and each call is answered UNAUTHENTICATED (a status, not a reset).
          requestCert: deps.tls.requestCert,
          rejectUnauthorized: false,
          handshakeTimeout: firstBytesTimeoutMs,
        },
        accept,
      )
    : net.createServer(accept);
  // A failed handshake has closed its socket already; nothing to serve.
  listener.on("tlsClientError", () => {});
  // The TCP sockets under TLS, handshaking or not: cut with the rest when the grace ends.
  const tcpUnderTls = new Set<net.Socket>();
  if (deps.tls) {
    listener.on("connection", (socket: net.Socket) => {
      tcpUnderTls.add(socket);
      socket.once("close", () => tcpUnderTls.delete(socket));
    });
  }

  listener.maxConnections = limits.maxConnections;

  await new Promise<void>((resolve, reject) => {
    const refused = (err: NodeJS.ErrnoException) => {
      const where = `${deps.host}:${deps.port}`;
      if (err.code === "EADDRINUSE")
        reject(new StartError(`${where} is already in use; stop what listens there or set PORT`));
      else if (err.code === "EADDRNOTAVAIL")
        reject(new StartError(`${deps.host} is not an address of this machine; set HOST`));
      else if (err.code === "EACCES")
        reject(new StartError(`listening on ${where} is not permitted; set PORT above 1023`));
      else if (err.code === "ENOTFOUND" || err.code === "EAI_AGAIN")
        reject(new StartError(`HOST ${deps.host} is not a name or address this machine can resolve; set HOST`));
      else reject(err);
    };
    listener.once("error", refused);
    listener.listen(deps.port, deps.host, () => {
      listener.off("error", refused);
      // Later errors (running out of file descriptors on accept) are reported, not fatal.
      listener.on("error", (err) => (deps.observers.logError ?? console.error)("listener error", err));
      resolve();
    });
  });
  const bound = listener.address() as net.AddressInfo;
  const host = bound.family === "IPv6" ? `[${bound.address}]` : bound.address;

  return {
    port: bound.port,
    address: `${host}:${bound.port}`,
    setTls(material) {
      if (listener instanceof tls.Server) listener.setSecureContext(material.options);
    },
    async close(graceMs = 10_000) {
      deps.health.drain();
      const stopped = new Promise<void>((resolve) => listener.close(() => resolve()));
      for (const socket of undecided) socket.destroy();
      httpServer.closeIdleConnections();
      const httpDone = new Promise<void>((resolve) => httpServer.close(() => resolve()));
      const grpcDone = new Promise<void>((resolve) => grpcServer.tryShutdown(() => resolve()));
      grpcConnections.drain(graceMs);
      const timer = setTimeout(() => {
        httpServer.closeAllConnections();
        grpcConnections.destroy();
        grpcServer.forceShutdown();
        for (const socket of http2Sockets) socket.destroy();
        for (const socket of tcpUnderTls) socket.destroy();
      }, graceMs);
      timer.unref();
      await Promise.all([stopped, httpDone, grpcDone]);
      clearTimeout(timer);
    },
  };
}

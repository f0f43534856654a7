import net from "node:net";

/** A proxy whose traffic a test can stop and start. */
export interface FreezableProxy {
  readonly address: string;
  pause(): void;
  resume(): void;
  close(): Promise<void>;
}

/**
 * A TCP proxy to `target` ("host:port") that a test can freeze: `pause()`
 * stops moving bytes both ways on every connection and holds new ones,
 * as a stopped database process does (SIGSTOP), and `resume()` lets them
 * flow again.
 */
export async function startFreezableProxy(target: string): Promise<FreezableProxy> {
  const [host, port] = target.split(":") as [string, string];
  const pairs = new Set<[net.Socket, net.Socket]>();
  let paused = false;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), host);
    const pair: [net.Socket, net.Socket] = [client, upstream];
    pairs.add(pair);
    client.pipe(upstream);
    upstream.pipe(client);
    if (paused) for (const s of pair) s.pause();
    const close = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address() as net.AddressInfo;
  return {
    address: `127.0.0.1:${address.port}`,
    pause() {
      paused = true;
      for (const pair of pairs) for (const s of pair) s.pause();
    },
    resume() {
      paused = false;
      for (const pair of pairs) for (const s of pair) s.resume();
    },
    async close() {
      for (const pair of pairs) for (const s of pair) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

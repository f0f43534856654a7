import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { promisify } from "node:util";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { expect } from "chai";
import { useTestService } from "./support/service.js";

const reflectionProtos = path.join(
  path.dirname(createRequire(import.meta.url).resolve("@grpc/reflection")),
  "../proto/grpc/reflection",
);

/** A reflection client for one version: sends `requests` on one stream, returns the answers. */
async function reflect(
  address: string,
  version: "v1" | "v1alpha",
  requests: object[],
): Promise<Record<string, unknown>[]> {
  const definition = protoLoader.loadSync(path.join(reflectionProtos, version, "reflection.proto"), {
    keepCase: false,
    defaults: false,
    oneofs: true,
  });
  const loaded = grpc.loadPackageDefinition(definition) as unknown as {
    grpc: { reflection: Record<string, { ServerReflection: grpc.ServiceClientConstructor }> };
  };
  const Client = loaded.grpc.reflection[version]?.ServerReflection as grpc.ServiceClientConstructor;
  const client = new Client(address, grpc.credentials.createInsecure());
  try {
    return await new Promise((resolve, reject) => {
      const answers: Record<string, unknown>[] = [];
      const call = (
        client as unknown as { serverReflectionInfo(): grpc.ClientDuplexStream<object, Record<string, unknown>> }
      ).serverReflectionInfo();
      call.on("data", (a: Record<string, unknown>) => answers.push(a));
      call.on("end", () => resolve(answers));
      call.on("error", reject);
      for (const r of requests) call.write(r);
      call.end();
    });
  } finally {
    client.close();
  }
}

const execFileAsync = promisify(execFile);

describe("server reflection", () => {
  const service = useTestService();

  for (const version of ["v1", "v1alpha"] as const) {
    it(`lists the services and serves the contract's real files, with comments (${version})`, async () => {
      const [listed, file] = await reflect(service.server.address, version, [
        { listServices: "*" },
        { fileContainingSymbol: "keysdriver.v1.KeysDriverService" },
      ]);
      const listing = listed?.listServicesResponse as { service: { name: string }[] } | undefined;
      const names = (listing?.service ?? []).map((s) => s.name);
      expect(names).to.have.members(["keysdriver.v1.KeysDriverService", "grpc.health.v1.Health"]);

      const response = file?.fileDescriptorResponse as { fileDescriptorProto: Buffer[] } | undefined;
      const encoded = response?.fileDescriptorProto ?? [];
      const files = encoded.map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
      const contract = files.find((f) => f.name === "keysdriver/v1/keys_driver.proto");
      expect(contract, "the contract's own file name").to.not.equal(undefined);
      expect(contract?.dependency).to.deep.equal(["google/protobuf/timestamp.proto"]);
      expect(files.map((f) => f.name)).to.include("google/protobuf/timestamp.proto");
      const comments = (contract?.sourceCodeInfo?.location ?? []).map((l) => l.leadingComments);
      expect(comments.some((c) => c.includes("Reads a tenant's API keys and flips their kill switch."))).to.equal(true);
    });
  }

  it("is enough for buf curl to list and call the methods with no schema", async function () {
    this.timeout(30_000);
    const buf = path.resolve("node_modules/.bin/buf");
    const url = `http://${service.server.address}`;
    const base = ["curl", "--protocol", "grpc", "--http2-prior-knowledge"];
    const { stdout: methods } = await execFileAsync(buf, [...base, "--list-methods", url]);
    expect(methods.split("\n")).to.include("keysdriver.v1.KeysDriverService/WatchKeys");
    const { stdout: health } = await execFileAsync(buf, [
      ...base,
      "--reflect-protocol",
      "grpc-v1alpha",
      "-d",
      "{}",
      `${url}/grpc.health.v1.Health/Check`,
    ]);
    expect(JSON.parse(health)).to.deep.equal({ status: "SERVING" });
  });
});

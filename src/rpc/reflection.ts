import { readFileSync } from "node:fs";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import type * as grpc from "@grpc/grpc-js";
import { ReflectionService } from "@grpc/reflection";

/**
 * gRPC server reflection, `grpc.reflection.v1` and `v1alpha` (grpcurl,
 * `buf curl`, Postman find the services with nothing but the address),
 * answered from the contract as `buf build` compiles it (gen/descriptors.binpb,
 * written by `npm run generate`): the real file names, imports and comments,
 * not an approximation rebuilt from loaded types. Served on the gRPC
 * protocol (the reflection stream is bidirectional, which Connect over
 * HTTP/1.1 cannot carry).
 */
export function addReflection(server: grpc.Server, serviceNames: readonly string[]): void {
  const set = fromBinary(
    FileDescriptorSetSchema,
    readFileSync(new URL("../../gen/descriptors.binpb", import.meta.url)),
  );
  // @grpc/reflection reads the files the way @grpc/proto-loader hands them over.
  const fileDescriptorProtos = set.file.map((file) => Buffer.from(toBinary(FileDescriptorProtoSchema, file)));
  const reflection = new ReflectionService({ contract: { fileDescriptorProtos } } as never, {
    services: [...serviceNames],
  });
  reflection.addToServer(server);
}

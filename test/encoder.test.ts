import { create, type DescMessage, toBinary } from "@bufbuild/protobuf";
import { expect } from "chai";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { KeysDriverService } from "../gen/keysdriver/v1/keys_driver_pb.js";
import { createEncoder } from "../src/transport/encoder.js";

// Random values for every field, driven by the descriptor, so that a field
// added to the contract is covered without touching this test.
function generator(seed: number) {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

const samples = [
  "",
  "a",
  "sk_live_ab12",
  "3f0e8c4a-5b1d-4c7e-9a2f-0b6d8e1c2a34",
  "ünïcødé ✓",
  "\u{1F511} key",
  "x".repeat(300),
];
const int64s = [0n, 1n, 127n, 128n, 9_007_199_254_740_993n, 2n ** 63n - 1n, -1n, -(2n ** 63n)];
const int32s = [0, 1, 127, 128, 300, 2 ** 31 - 1, -1, -(2 ** 31)];

function randomMessage(schema: DescMessage, random: () => number, depth = 0): Record<string, unknown> {
  const pick = <T>(list: readonly T[]) => list[Math.floor(random() * list.length)] as T;
  const init: Record<string, unknown> = {};
  for (const field of schema.fields) {
    if (random() < 0.2) continue; // leave some fields unset
    if (field.fieldKind === "scalar") {
      init[field.localName] =
        field.scalar === 9 /* STRING */
          ? pick(samples)
          : field.scalar === 8 /* BOOL */
            ? random() < 0.5
            : field.scalar === 3 /* INT64 */
              ? pick(int64s)
              : pick(int32s);
    } else if (field.fieldKind === "enum") {
      init[field.localName] = pick(field.enum.values).number;
    } else if (field.fieldKind === "message" && depth < 3) {
      init[field.localName] = create(field.message, randomMessage(field.message, random, depth + 1));
    } else if (field.fieldKind === "list" && depth < 3) {
      const n = Math.floor(random() * 4);
      init[field.localName] = Array.from({ length: n }, () =>
        field.listKind === "message"
          ? create(field.message, randomMessage(field.message, random, depth + 1))
          : pick(samples),
      );
    }
  }
  return init;
}

describe("the compiled response encoder", () => {
  const outputs = [...KeysDriverService.methods, ...Health.methods].map((m) => m.output);

  for (const schema of outputs) {
    it(`writes ${schema.typeName} byte for byte as toBinary does, on the fast path`, () => {
      const encoder = createEncoder(schema);
      expect(encoder.fast, "fell back to toBinary").to.equal(true);
      const random = generator(schema.typeName.length);
      for (let i = 0; i < 300; i++) {
        const message = create(schema, randomMessage(schema, random));
        expect(encoder.encode(message).toString("hex"), `message ${i}`).to.equal(
          Buffer.from(toBinary(schema, message)).toString("hex"),
        );
      }
    });
  }
});

import { type DescField, type DescMessage, type MessageShape, ScalarType, toBinary } from "@bufbuild/protobuf";

// A protobuf binary encoder compiled once per message schema from its
// descriptor, the way protobufjs works: sizes first, then one Buffer written
// in place. protobuf-es's toBinary walks the schema by reflection on every
// call and encodes each string into its own array; on a page of 50 keys that
// was most of the server's CPU per call (docs/DESIGN.md). The output is
// byte-for-byte what toBinary writes (test/encoder.test.ts checks every
// response message of the contract on random values), and any schema that
// uses a field kind not handled here is left to toBinary whole.

type Message = Record<string, unknown> & { $unknown?: unknown[] };

interface Compiled {
  size(message: Message): number;
  write(message: Message, buf: Buffer, pos: number): number;
}

interface FieldPlan {
  readonly name: string;
  /** False for a value that is not written (unset, default, empty list). */
  present(value: unknown): boolean;
  size(value: unknown): number;
  write(value: unknown, buf: Buffer, pos: number): number;
}

function varintSize(n: number): number {
  let size = 1;
  while (n >= 128) {
    n = Math.floor(n / 128);
    size++;
  }
  return size;
}

function writeVarint(n: number, buf: Buffer, pos: number): number {
  while (n >= 128) {
    buf[pos++] = (n % 128) | 128;
    n = Math.floor(n / 128);
  }
  buf[pos++] = n;
  return pos;
}

const maxSafe = BigInt(Number.MAX_SAFE_INTEGER);

// int64 as protobuf's varint: negatives are their 64-bit two's complement.
function int64Parts(v: bigint): number | bigint {
  if (v >= 0n && v <= maxSafe) return Number(v);
  return BigInt.asUintN(64, v);
}

const asBigInt = (v: unknown): bigint => (typeof v === "bigint" ? v : BigInt(v as string));

function bigVarintSize(v: bigint): number {
  let size = 1;
  while (v >= 128n) {
    v >>= 7n;
    size++;
  }
  return size;
}

function writeBigVarint(v: bigint, buf: Buffer, pos: number): number {
  while (v >= 128n) {
    buf[pos++] = Number(v & 127n) | 128;
    v >>= 7n;
  }
  buf[pos++] = Number(v);
  return pos;
}

function int64Size(v: bigint): number {
  const p = int64Parts(v);
  return typeof p === "number" ? varintSize(p) : bigVarintSize(p);
}

function writeInt64(v: bigint, buf: Buffer, pos: number): number {
  const p = int64Parts(v);
  return typeof p === "number" ? writeVarint(p, buf, pos) : writeBigVarint(p, buf, pos);
}

// int32 and enums: a negative value is sign-extended to 64 bits (10 bytes).
function int32Size(v: number): number {
  return v < 0 ? 10 : varintSize(v);
}

function writeInt32(v: number, buf: Buffer, pos: number): number {
  return v < 0 ? writeBigVarint(BigInt.asUintN(64, BigInt(v)), buf, pos) : writeVarint(v, buf, pos);
}

function tagBytes(field: DescField, wireType: number): number[] {
  const buf = Buffer.alloc(varintSize(field.number * 8 + wireType));
  writeVarint(field.number * 8 + wireType, buf, 0);
  return [...buf];
}

function writeTag(tag: number[], buf: Buffer, pos: number): number {
  for (const byte of tag) buf[pos++] = byte;
  return pos;
}

interface ValueCodec {
  readonly wireType: number;
  isDefault(value: unknown): boolean;
  size(value: unknown): number;
  write(value: unknown, buf: Buffer, pos: number): number;
}

// Short ASCII strings (ids, prefixes, etags) are measured and copied in JS:
// for a few dozen bytes that beats a call into Buffer's native UTF-8 code.
const shortString = 64;

function isShortAscii(s: string): boolean {
  if (s.length > shortString) return false;
  for (let i = 0; i < s.length; i++) if (s.charCodeAt(i) > 0x7f) return false;
  return true;
}

function utf8Length(s: string): number {
  return isShortAscii(s) ? s.length : Buffer.byteLength(s, "utf8");
}

const stringCodec: ValueCodec = {
  wireType: 2,
  isDefault: (v) => v === "",
  size: (v) => {
    const n = utf8Length(v as string);
    return varintSize(n) + n;
  },
  write: (v, buf, pos) => {
    const s = v as string;
    if (isShortAscii(s)) {
      buf[pos++] = s.length; // < 128: one varint byte
      for (let i = 0; i < s.length; i++) buf[pos++] = s.charCodeAt(i);
      return pos;
    }
    const at = writeVarint(Buffer.byteLength(s, "utf8"), buf, pos);
    return at + buf.write(s, at, "utf8");
  },
};

const scalarCodecs: Partial<Record<ScalarType, ValueCodec>> = {
  [ScalarType.STRING]: stringCodec,
  [ScalarType.BOOL]: {
    wireType: 0,
    isDefault: (v) => v === false,
    size: () => 1,
    write: (v, buf, pos) => {
      buf[pos] = v ? 1 : 0;
      return pos + 1;
    },
  },
  [ScalarType.INT32]: {
    wireType: 0,
    isDefault: (v) => v === 0,
    size: (v) => int32Size(v as number),
    write: (v, buf, pos) => writeInt32(v as number, buf, pos),
  },
  [ScalarType.UINT32]: {
    wireType: 0,
    isDefault: (v) => v === 0,
    size: (v) => varintSize((v as number) >>> 0),
    write: (v, buf, pos) => writeVarint((v as number) >>> 0, buf, pos),
  },
  [ScalarType.INT64]: {
    wireType: 0,
    // protobuf-es may carry int64 as a string (jstype = JS_STRING).
    isDefault: (v) => v === 0n || v === "0",
    size: (v) => int64Size(asBigInt(v)),
    write: (v, buf, pos) => writeInt64(asBigInt(v), buf, pos),
  },
};

const enumCodec = scalarCodecs[ScalarType.INT32] as ValueCodec;

function messageCodec(compiled: Compiled): ValueCodec {
  return {
    wireType: 2,
    isDefault: (v) => v === undefined,
    size: (v) => {
      const n = compiled.size(v as Message);
      return varintSize(n) + n;
    },
    write: (v, buf, pos) => {
      const at = writeVarint(compiled.size(v as Message), buf, pos);
      return compiled.write(v as Message, buf, at);
    },
  };
}

const compiledBySchema = new WeakMap<DescMessage, Compiled | null>();

// Null when the schema (or one it contains) has a field this encoder does not
// handle: oneofs, maps, explicit presence, other scalar types.
function compile(schema: DescMessage): Compiled | null {
  const known = compiledBySchema.get(schema);
  if (known !== undefined) return known;
  compiledBySchema.set(schema, null); // recursion guard: recursive schemas fall back
  const plans: FieldPlan[] = [];
  for (const field of schema.fields) {
    if (field.oneof !== undefined) return null;
    // A scalar with explicit presence (proto3 `optional`) is written even when
    // zero; message fields always have explicit presence (unset = undefined).
    if (field.fieldKind !== "message" && field.fieldKind !== "list" && field.presence === 1) return null;
    let codec: ValueCodec | undefined;
    let repeated = false;
    if (field.fieldKind === "scalar") codec = scalarCodecs[field.scalar];
    else if (field.fieldKind === "enum") codec = enumCodec;
    else if (field.fieldKind === "message") {
      const sub = compile(field.message);
      codec = sub ? messageCodec(sub) : undefined;
    } else if (field.fieldKind === "list") {
      repeated = true;
      if (field.listKind === "message") {
        const sub = compile(field.message);
        codec = sub ? messageCodec(sub) : undefined;
      } else if (field.listKind === "scalar" && field.scalar === ScalarType.STRING) codec = stringCodec;
    }
    if (!codec) return null;
    const c = codec;
    const tag = tagBytes(field, c.wireType);
    plans.push(
      repeated
        ? {
            name: field.localName,
            present: (v) => (v as unknown[]).length > 0,
            size: (v) => (v as unknown[]).reduce<number>((sum, item) => sum + tag.length + c.size(item), 0),
            write: (v, buf, pos) => {
              for (const item of v as unknown[]) {
                pos = c.write(item, buf, writeTag(tag, buf, pos));
              }
              return pos;
            },
          }
        : {
            name: field.localName,
            present: (v) => !c.isDefault(v),
            size: (v) => tag.length + c.size(v),
            write: (v, buf, pos) => c.write(v, buf, writeTag(tag, buf, pos)),
          },
    );
  }
  const compiled: Compiled = {
    size(message) {
      let size = 0;
      for (const plan of plans) {
        const value = message[plan.name];
        if (plan.present(value)) size += plan.size(value);
      }
      return size;
    },
    write(message, buf, pos) {
      for (const plan of plans) {
        const value = message[plan.name];
        if (plan.present(value)) pos = plan.write(value, buf, pos);
      }
      return pos;
    },
  };
  compiledBySchema.set(schema, compiled);
  return compiled;
}

/**
 * A function that encodes messages of `schema` exactly as toBinary does,
 * faster where the schema allows; `fast` says which it got.
 */
export function createEncoder<D extends DescMessage>(
  schema: D,
): { fast: boolean; encode(message: MessageShape<D>): Buffer } {
  const compiled = compile(schema);
  const slow = (message: MessageShape<D>) => {
    const bytes = toBinary(schema, message);
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };
  if (!compiled) return { fast: false, encode: slow };
  return {
    fast: true,
    encode(message) {
      const m = message as unknown as Message;
      // Unknown fields carried from elsewhere: let toBinary keep them.
      if (m.$unknown !== undefined && m.$unknown.length > 0) return slow(message);
      const buf = Buffer.allocUnsafe(compiled.size(m));
      compiled.write(m, buf, 0);
      return buf;
    },
  };
}

// Loaded before anything else, by every entry point (`node --import
// ./src/preload.js`; package.json, .mocharc.json, the processes tests and
// the benchmark start): registers the fix in ./transport/connect-fixes.js,
// which must be in place before @connectrpc/connect is first loaded, then
// tsx, which runs the TypeScript sources.
import { register } from "node:module";

register("./transport/connect-fixes.js", import.meta.url);
await import("tsx");

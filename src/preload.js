// Loaded before anything else, by every entry point (`node --import
// ./src/preload.js`; package.json, .mocharc.json, the processes tests and
// the benchmark start): registers the fix in ./transport/connect-fixes.js,
// which must be in place before @connectrpc/connect is first loaded, then
// the hooks that run the TypeScript sources (./typescript-hooks.js), with
// stack traces mapped back to them.
import { register } from "node:module";

process.setSourceMapsEnabled(true);
register("./transport/connect-fixes.js", import.meta.url);
register("./typescript-hooks.js", import.meta.url);

/**
 * How node runs a process that serves calls: `npm start` (package.json says
 * the same; a test holds the two together), and the processes the
 * benchmark, the reliability harness and the tests start.
 *
 * `--max-semi-space-size=32` (MB) gives V8's young generation room for the
 * objects of the calls in flight: with the default, a call's objects are
 * often still alive at the next scavenge, get copied twice and promoted,
 * and the old generation's collector then works on helper threads for
 * objects that died a millisecond later. V8 reads the size when the heap is
 * made, so it must be on the command line (or in NODE_OPTIONS), not set at
 * run time; worker mode's processes inherit it. Measured in docs/DESIGN.md,
 * "Garbage collection".
 */
export const serviceNodeArgs: readonly string[] = ["--max-semi-space-size=32", "--import", "./src/preload.js"];

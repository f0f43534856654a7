// Module hooks (node:module register) that run this project's TypeScript:
// each .ts file is compiled on load by esbuild, types stripped and nothing
// else changed. tsx did this before; it also asks esbuild to keep every
// function's name (keepNames), which wraps each closure in a call that
// defines its `name` as the closure is made: on the request path that is a
// cost per call (docs/DESIGN.md, "Running the TypeScript"). The sources
// import one another by the names tsc would give the output (./x.js for
// ./x.ts); such an import finds the .ts file.
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { transform } from "esbuild";

// What esbuild needs of tsconfig.json to compile as tsc checks: imports are
// kept as written (verbatimModuleSyntax), class fields are defined (ES2023).
const tsconfigRaw = { compilerOptions: { verbatimModuleSyntax: true, target: "ES2023" } };

export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context);
  } catch (err) {
    const relative = specifier.startsWith("./") || specifier.startsWith("../");
    if (!relative || !specifier.endsWith(".js") || err?.code !== "ERR_MODULE_NOT_FOUND") throw err;
    return nextResolve(`${specifier.slice(0, -3)}.ts`, context);
  }
}

export async function load(url, context, nextLoad) {
  if (!url.startsWith("file:") || !url.endsWith(".ts")) return nextLoad(url, context);
  const path = fileURLToPath(url);
  const { code } = await transform(await readFile(path, "utf8"), {
    loader: "ts",
    format: "esm",
    target: `node${process.versions.node}`,
    sourcemap: "inline",
    sourcefile: path,
    tsconfigRaw,
  });
  return { format: "module", source: code, shortCircuit: true };
}

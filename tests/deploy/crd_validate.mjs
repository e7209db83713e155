// Validates custom resources against their CRDs' OpenAPI schemas, as published in the
// @kubernetes-models packages (KEDA, Argo CD, Flux, Prometheus Operator).
//
// Usage: node crd_validate.mjs NODE_MODULES_DIR < objects.json
// Reads a JSON array of objects; writes a JSON array with, for each object, null when it
// is valid, or a message. A kind no package covers gets a message too.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

// API group -> the package that models it.
const PACKAGES = [
  [/^keda\.sh$/, "keda"],
  [/^argoproj\.io$/, "argo-cd"],
  [/\.toolkit\.fluxcd\.io$/, "flux-cd"],
  [/^monitoring\.coreos\.com$/, "prometheus-operator"],
];

async function validate(nodeModules, object) {
  const [group, version] = String(object.apiVersion ?? "").split("/");
  const entry = PACKAGES.find(([pattern]) => pattern.test(group ?? ""));
  if (!entry || !version) {
    return `no CRD schema package for ${object.apiVersion} ${object.kind}`;
  }
  const module = join(nodeModules, "@kubernetes-models", entry[1], group, version, "index.js");
  let models;
  try {
    models = await import(pathToFileURL(module).href);
  } catch {
    return `no CRD schema for ${object.apiVersion} (looked for ${module})`;
  }
  const Model = models[object.kind];
  if (typeof Model !== "function") {
    return `no CRD schema for kind ${object.kind} in ${object.apiVersion}`;
  }
  try {
    new Model(object).validate();
    return null;
  } catch (error) {
    return `CRD schema: ${error.message}`;
  }
}

const nodeModules = process.argv[2];
if (!nodeModules) {
  console.error("usage: node crd_validate.mjs NODE_MODULES_DIR < objects.json");
  process.exit(2);
}
const objects = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const object of objects) {
  results.push(await validate(nodeModules, object));
}
process.stdout.write(JSON.stringify(results));

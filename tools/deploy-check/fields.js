// Unknown-field detection for Kubernetes objects.
//
// The OpenAPI schemas behind kubernetes-models' validate() do not forbid
// extra properties (neither do Kubernetes' own), so a misspelt field
// (`resource:` for `resources:`) validates and is then dropped or refused
// by the API server. The field sets are read instead from the packages'
// TypeScript declarations: every model's .d.ts declares its interface with
// each property, and refers to the types of nested objects by import. This
// module parses that subset of TypeScript (interfaces, inline object
// types, Array<T>, index signatures, unions, literals and named types) and
// walks an object against it.
"use strict";

const fs = require("fs");
const path = require("path");

const cache = new Map(); // .d.ts path -> {imports, types}

function tokenize(src) {
  src = src.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/[^\n]*/g, "");
  const re = /\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[A-Za-z_$][\w$]*|-?\d+(?:\.\d+)?|[{}()[\]<>;:,?|&=.*])/y;
  const out = [];
  let m;
  re.lastIndex = 0;
  while (re.lastIndex < src.length && (m = re.exec(src)) !== null) out.push(m[1]);
  return out;
}

// Parses a type at tokens[i]; returns [type, next index]. Types:
// {kind: "object", props: Map, index: type|null} | {kind: "array", of}
// | {kind: "ref", name} | {kind: "union", of: [...]} | {kind: "leaf"}.
function parseType(t, i) {
  const alts = [];
  if (t[i] === "|") i++;
  for (;;) {
    let ty;
    [ty, i] = parsePrimary(t, i);
    while (t[i] === "[" && t[i + 1] === "]") {
      ty = { kind: "array", of: ty };
      i += 2;
    }
    alts.push(ty);
    if (t[i] !== "|" && t[i] !== "&") break;
    i++;
  }
  if (alts.length === 1) return [alts[0], i];
  return [{ kind: "union", of: alts }, i];
}

function parsePrimary(t, i) {
  const tok = t[i];
  if (tok === "{") return parseObject(t, i);
  if (tok === "(") {
    const [ty, j] = parseType(t, i + 1);
    return [ty, j + 1];
  }
  if (tok === "Array" && t[i + 1] === "<") {
    const [of, j] = parseType(t, i + 2);
    return [{ kind: "array", of }, j + 1];
  }
  if (/^[A-Za-z_$]/.test(tok) && !["string", "number", "boolean", "any", "unknown", "null", "undefined", "object", "true", "false"].includes(tok)) {
    let j = i + 1;
    let name = tok;
    while (t[j] === ".") {
      name += "." + t[j + 1];
      j += 2;
    }
    if (t[j] === "<") {
      // Generic arguments (Record<...>, Partial<...>): treat as opaque.
      let depth = 0;
      do {
        if (t[j] === "<") depth++;
        if (t[j] === ">") depth--;
        j++;
      } while (depth > 0 && j < t.length);
      return [{ kind: "leaf" }, j];
    }
    return [{ kind: "ref", name }, j];
  }
  return [{ kind: "leaf" }, i + 1];
}

function parseObject(t, i) {
  // t[i] === "{"
  const props = new Map();
  let index = null;
  i++;
  while (t[i] !== "}") {
    if (t[i] === "[") {
      // [key: string]: T;
      let j = i;
      while (t[j] !== "]") j++;
      const [ty, k] = parseType(t, j + 2);
      index = ty;
      i = k;
    } else {
      let name = t[i];
      if (name[0] === '"' || name[0] === "'") name = name.slice(1, -1);
      i++;
      if (t[i] === "?") i++;
      i++; // ':'
      const [ty, k] = parseType(t, i);
      props.set(name, ty);
      i = k;
    }
    if (t[i] === ";" || t[i] === ",") i++;
  }
  return [{ kind: "object", props, index }, i + 1];
}

function load(file) {
  if (cache.has(file)) return cache.get(file);
  const t = tokenize(fs.readFileSync(file, "utf8"));
  const imports = new Map(); // local name -> resolved .d.ts
  const types = new Map(); // declared name -> type
  const aliases = new Map(); // exported alias -> declared name
  const entry = { imports, types, aliases, file };
  cache.set(file, entry);
  for (let i = 0; i < t.length; i++) {
    if (t[i] === "import" && t[i + 1] === "{") {
      const names = [];
      let j = i + 2;
      while (t[j] !== "}") {
        if (t[j] === ",") {
          j++;
          continue;
        }
        let local = t[j];
        if (t[j + 1] === "as") {
          local = t[j + 2];
          j += 3;
        } else {
          j++;
        }
        names.push(local);
      }
      const spec = t[j + 2].slice(1, -1);
      const resolved = resolveModule(spec, path.dirname(file));
      for (const n of names) if (resolved) imports.set(n, resolved);
      i = j + 2;
    } else if (t[i] === "interface") {
      const name = t[i + 1];
      let j = i + 2;
      const bases = [];
      if (t[j] === "extends") {
        j++;
        while (t[j] !== "{") {
          if (t[j] !== ",") bases.push(t[j]);
          j++;
        }
      }
      const [ty, k] = parseObject(t, j);
      // TypeMeta's apiVersion and kind are declared on the interface too.
      types.set(name, ty);
      i = k - 1;
    } else if (t[i] === "type" && t[i + 2] === "=" && (t[i - 1] === "declare" || t[i - 1] === "export")) {
      const [ty, k] = parseType(t, i + 3);
      types.set(t[i + 1], ty);
      i = k - 1;
    } else if (t[i] === "export" && t[i + 1] === "{") {
      let j = i + 2;
      while (t[j] !== "}") {
        if (t[j + 1] === "as") {
          aliases.set(t[j + 2], t[j]);
          j += 3;
        } else {
          j++;
        }
        if (t[j] === ",") j++;
      }
      i = j;
    }
  }
  return entry;
}

function resolveModule(spec, dir) {
  let base;
  if (spec.startsWith(".")) {
    base = path.resolve(dir, spec);
  } else {
    try {
      base = require.resolve(spec, { paths: [dir] }).replace(/\.(m?js)$/, "");
    } catch {
      return null;
    }
  }
  for (const cand of [base + ".d.ts", path.join(base, "index.d.ts")]) {
    if (fs.existsSync(cand)) return cand;
  }
  return null;
}

// Resolves a {kind: "ref"} in the scope of `file` to a concrete type and
// the file whose scope its own references use.
function resolveRef(name, file, depth = 0) {
  if (depth > 20) return null;
  const entry = load(file);
  const local = entry.aliases.get(name) || name;
  if (entry.types.has(local)) return { type: entry.types.get(local), file };
  if (entry.imports.has(name)) {
    const target = entry.imports.get(name);
    const t = load(target);
    const declared = t.aliases.get(name) || name;
    if (t.types.has(declared)) return { type: t.types.get(declared), file: target };
    return resolveRef(declared, target, depth + 1);
  }
  return null;
}

// The type of a top-level object: the interface in the model's .d.ts.
function rootType(modelFile, kind) {
  const entry = load(modelFile);
  const name = "I" + kind;
  if (entry.types.has(name)) return { type: entry.types.get(name), file: modelFile };
  return null;
}

// Returns [{path, field}] for every property of `value` its type does not
// declare. Paths are dotted, with [i] for list items.
function unknownFields(value, type, file, p = "", out = []) {
  if (value === null || value === undefined || type === null) return out;
  switch (type.kind) {
    case "ref": {
      const r = resolveRef(type.name, file);
      if (r) unknownFields(value, r.type, r.file, p, out);
      return out;
    }
    case "union": {
      // Objects: the first object-like alternative decides.
      const objAlt = type.of.find((a) => a.kind !== "leaf");
      if (objAlt && typeof value === "object") unknownFields(value, objAlt, file, p, out);
      return out;
    }
    case "array":
      if (Array.isArray(value)) value.forEach((v, i) => unknownFields(v, type.of, file, `${p}[${i}]`, out));
      return out;
    case "object":
      if (typeof value !== "object" || Array.isArray(value)) return out;
      for (const [k, v] of Object.entries(value)) {
        const sub = p ? `${p}.${k}` : k;
        if (type.props.has(k)) unknownFields(v, type.props.get(k), file, sub, out);
        else if (type.index) unknownFields(v, type.index, file, sub, out);
        else out.push({ path: sub, field: k });
      }
      return out;
    default:
      return out;
  }
}

module.exports = { rootType, unknownFields };

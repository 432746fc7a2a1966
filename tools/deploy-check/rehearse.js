#!/usr/bin/env node
// Plans tools/rehearse_deploy.sh's processes from a rendered overlay:
//
//   node rehearse.js RENDERED.yaml REPO WORKDIR PORT...
//
// One process per strata container of each Deployment (one replica), with
// the container's arguments and environment as Kubernetes would give them
// (env values, fieldRefs, ConfigMap keys and envFrom, then $(VAR) in the
// arguments), and these substitutions to run on loopback without a GPU:
//   the model directory (/models/...)      -> REPO/models/tiny-llama
//   --backend cuda                         -> cpu
//   --host 0.0.0.0                         -> 127.0.0.1
//   --port, --metrics-port                 -> free loopback ports (PORT...)
//   $(POD_IP) (status.podIP)               -> 127.0.0.1
//   --advertise HOST:P                     -> 127.0.0.1:(its --port)
//   --workers dns:///SERVICE:P             -> dns:///127.0.0.1:(the --port of
//                                             the pods SERVICE selects)
//   --profile /etc/strata/profiles/F       -> WORKDIR/NAME/profiles/F: F as the
//                                             ConfigMap holds it (deploy/profiles),
//                                             byte budgets divided by 256 and
//                                             tiers.ssd_path -> WORKDIR/NAME/kv
//   --kv-export-bytes, --kv-landing-bytes  -> divided by 256
//   UCX_NET_DEVICES                        -> lo
//   CUDA_CACHE_PATH                        -> WORKDIR/NAME/cuda-cache
// Writes WORKDIR/NAME.argv and WORKDIR/NAME.env (NUL-separated arguments
// and NAME=VALUE pairs) and prints one line per process, workers before
// the router: NAME ROLE PORT METRICS_PORT.
"use strict";

const fs = require("fs");
const path = require("path");
const YAML = require("yaml");

const SCALE = 256;
const STRATA_COMMANDS = new Set(["serve", "router", "prefill", "decode"]);

function fail(msg) {
  console.error(`rehearse.js: ${msg}`);
  process.exit(1);
}

const [rendered, repo, workdir, ...portArgs] = process.argv.slice(2);
if (!rendered || !repo || !workdir) fail("usage: rehearse.js RENDERED.yaml REPO WORKDIR PORT...");
const ports = portArgs.map(Number);
const objs = YAML.parseAllDocuments(fs.readFileSync(rendered, "utf8")).map((d) => d.toJS()).filter(Boolean);
const configMaps = new Map(objs.filter((o) => o.kind === "ConfigMap").map((o) => [o.metadata.name, o]));

function bytesOf(v) {
  const m = /^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*$/.exec(String(v));
  if (!m) return null;
  const mult = { B: 1, KiB: 1 << 10, MiB: 1 << 20, GiB: 2 ** 30, TiB: 2 ** 40 }[m[2] || "B"];
  return Number(m[1]) * mult;
}

// Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes.
function expand(s, env) {
  return String(s).replace(/\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (all, name) => {
    if (all === "$$") return "$";
    return Object.prototype.hasOwnProperty.call(env, name) ? env[name] : all;
  });
}

function containerEnv(c, name) {
  const env = {};
  for (const ef of c.envFrom || []) {
    if (!ef.configMapRef) continue;
    const cm = configMaps.get(ef.configMapRef.name);
    if (!cm) fail(`${name}: envFrom ConfigMap ${ef.configMapRef.name} is not in the rendering`);
    for (const [k, v] of Object.entries(cm.data || {})) env[(ef.prefix || "") + k] = v;
  }
  for (const e of c.env || []) {
    if (e.value !== undefined) env[e.name] = expand(e.value, env);
    else if (e.valueFrom && e.valueFrom.fieldRef) {
      const f = e.valueFrom.fieldRef.fieldPath;
      env[e.name] = { "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "metadata.namespace": "default", "metadata.name": name, "spec.nodeName": "localhost" }[f];
      if (env[e.name] === undefined) fail(`${name}: env ${e.name}: fieldRef ${f} is not rehearsed`);
    } else if (e.valueFrom && e.valueFrom.configMapKeyRef) {
      const ref = e.valueFrom.configMapKeyRef;
      const cm = configMaps.get(ref.name);
      if (!cm || !cm.data || cm.data[ref.key] === undefined) fail(`${name}: env ${e.name}: ConfigMap ${ref.name} key ${ref.key} missing`);
      env[e.name] = cm.data[ref.key];
    } else {
      fail(`${name}: env ${e.name}: this kind of value is not rehearsed`);
    }
  }
  return env;
}

// The scaled-down copy of a profile the container would read at `file`.
function profileCopy(c, volumes, file, dir) {
  const mount = (c.volumeMounts || []).find((m) => file.startsWith(m.mountPath.replace(/\/?$/, "/")));
  const vol = mount && volumes.get(mount.name);
  const cm = vol && vol.configMap && configMaps.get(vol.configMap.name);
  const key = mount && file.slice(mount.mountPath.replace(/\/?$/, "/").length);
  if (!cm || !cm.data || cm.data[key] === undefined) fail(`--profile ${file} is not in a mounted ConfigMap`);
  const doc = YAML.parseDocument(cm.data[key]);
  const tiers = doc.get("tiers");
  if (tiers && tiers.items) {
    for (const item of tiers.items) {
      const k = String(item.key.value !== undefined ? item.key.value : item.key);
      if (k === "ssd_path") {
        item.value = doc.createNode(path.join(dir, "kv"));
      } else if (k.endsWith("_bytes")) {
        const b = bytesOf(item.value.value !== undefined ? item.value.value : item.value);
        if (b === null) fail(`${file}: tiers.${k}: cannot read ${item.value}`);
        item.value = doc.createNode(`${Math.max(1, Math.floor(b / SCALE / (1 << 20)))}MiB`);
      }
    }
  }
  fs.mkdirSync(path.join(dir, "profiles"), { recursive: true });
  fs.mkdirSync(path.join(dir, "kv"), { recursive: true });
  const out = path.join(dir, "profiles", key);
  fs.writeFileSync(out, doc.toString());
  return out;
}

// Processes, and which pod labels they carry (for Service selectors).
const procs = [];
for (const o of objs) {
  if (o.kind !== "Deployment" && o.kind !== "StatefulSet") continue;
  const spec = o.spec.template.spec;
  const volumes = new Map((spec.volumes || []).map((v) => [v.name, v]));
  for (const c of spec.containers || []) {
    const args = (c.args || []).map(String);
    if (!STRATA_COMMANDS.has(args[0])) continue;
    const name = `${o.metadata.name}.${c.name}`;
    procs.push({ name, role: args[0], labels: o.spec.template.metadata.labels || {}, c, volumes, env: containerEnv(c, name) });
  }
}
if (procs.length * 2 > ports.length) fail(`need ${procs.length * 2} ports, got ${ports.length}`);
procs.forEach((p, i) => {
  p.port = ports[2 * i];
  p.metricsPort = ports[2 * i + 1];
});

function servicePort(svcName) {
  const svc = objs.find((o) => o.kind === "Service" && o.metadata.name === svcName);
  if (!svc) fail(`--workers names ${svcName}, which is not a Service of the rendering`);
  const sel = svc.spec.selector || {};
  const hits = procs.filter((p) => Object.keys(sel).length && Object.entries(sel).every(([k, v]) => p.labels[k] === v));
  if (hits.length !== 1) fail(`Service ${svcName} selects ${hits.length} rehearsed processes, expected 1`);
  return hits[0].port;
}

const out = [];
for (const p of procs) {
  const dir = path.join(workdir, p.name);
  fs.mkdirSync(dir, { recursive: true });
  const env = { ...p.env };
  if ("UCX_NET_DEVICES" in env) env.UCX_NET_DEVICES = "lo";
  if ("CUDA_CACHE_PATH" in env) env.CUDA_CACHE_PATH = path.join(dir, "cuda-cache");
  const src = (p.c.args || []).map((a) => expand(a, env));
  const argv = [src[0]];
  for (let i = 1; i < src.length; i++) {
    let a = src[i];
    let v = null;
    const eq = a.startsWith("--") ? a.indexOf("=") : -1;
    if (eq > 0) {
      v = a.slice(eq + 1);
      a = a.slice(0, eq);
    } else if (a.startsWith("--") && i + 1 < src.length && !src[i + 1].startsWith("--")) {
      v = src[++i];
    }
    switch (a) {
      case "--model":
        if (v.startsWith("/models/")) v = path.join(repo, "models", "tiny-llama");
        break;
      case "--backend":
        v = "cpu";
        break;
      case "--host":
        v = "127.0.0.1";
        break;
      case "--port":
        v = String(p.port);
        break;
      case "--metrics-port":
        v = String(p.metricsPort);
        break;
      case "--advertise":
        v = `127.0.0.1:${p.port}`;
        break;
      case "--workers": {
        const m = /^(dns:\/\/\/)?([^:/.]+)(?:\.[^:]*)?:(\d+)$/.exec(v);
        if (!m) fail(`${p.name}: --workers ${v}: expected dns:///SERVICE:PORT`);
        v = `${m[1] || ""}127.0.0.1:${servicePort(m[2])}`;
        break;
      }
      case "--profile":
        v = profileCopy(p.c, p.volumes, v, dir);
        break;
      case "--kv-export-bytes":
      case "--kv-landing-bytes":
        v = String(Math.max(1 << 20, Math.floor(Number(v) / SCALE)));
        break;
      default:
        break;
    }
    argv.push(a);
    if (v !== null) argv.push(v);
  }
  for (const a of argv) if (/\$\([A-Za-z_]/.test(a)) fail(`${p.name}: ${a}: undefined $(VAR) left after expansion`);
  out.push({ name: p.name, role: p.role, port: p.port, metrics_port: p.metricsPort, argv, env });
}
// Workers first: the router finds them when it starts.
out.sort((a, b) => (a.role === "router") - (b.role === "router"));
for (const o of out) {
  fs.writeFileSync(path.join(workdir, `${o.name}.argv`), o.argv.map((a) => a + "\0").join(""));
  fs.writeFileSync(path.join(workdir, `${o.name}.env`), Object.entries(o.env).map(([k, v]) => `${k}=${v}\0`).join(""));
  console.log([o.name, o.role, o.port, o.metrics_port].join(" "));
}

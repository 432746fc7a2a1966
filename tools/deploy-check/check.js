#!/usr/bin/env node
// Validates rendered Kubernetes manifests (the output of `kubectl
// kustomize`), as tools/check_deploy.sh runs it:
//
//   node check.js [--profiles-dir DIR] NAME=FILE...
//
// Each FILE is one rendered overlay, NAME what messages call it. Every
// object is checked against the Kubernetes OpenAPI schema of its kind
// (kubernetes-models; ServiceMonitor: @kubernetes-models/prometheus-operator),
// for fields its kind does not have, and against strata's own rules:
// resources, probes, pinned images, GPUs, the drain, /dev/shm, the SSD
// tier's volume, the profiles' ConfigMap, scrape annotations, discovery.
// Every problem is one line, `NAME: Kind/name: field.path: problem`; the
// exit status is 1 when there is any.
"use strict";

const fs = require("fs");
const path = require("path");
const YAML = require("yaml");
const { rootType, unknownFields } = require("./fields");

const STRATA_COMMANDS = new Set(["serve", "router", "prefill", "decode"]);
const GPU_COMMANDS = new Set(["serve", "prefill", "decode"]);
const POD_KINDS = new Set(["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"]);
// strata's defaults (cli/serve_command.h) for flags a manifest may omit.
const DEFAULT_GRACE_SECONDS = 30;
const DEFAULT_PORT = 50051;
const DRAIN_MARGIN_SECONDS = 5;

const problems = [];
function report(source, obj, field, message) {
  const id = obj ? `${obj.kind}/${(obj.metadata && obj.metadata.name) || "?"}` : "-";
  problems.push(`${source}: ${id}: ${field}: ${message}`);
}

// --- schema ----------------------------------------------------------------

function modelFile(obj) {
  const [group, version] = obj.apiVersion.includes("/") ? obj.apiVersion.split("/") : ["", obj.apiVersion];
  const candidates = [];
  if (group === "monitoring.coreos.com") {
    candidates.push(`@kubernetes-models/prometheus-operator/${group}/${version}/${obj.kind}`);
  } else {
    candidates.push(`kubernetes-models/${group ? group + "/" : ""}${version}/${obj.kind}`);
  }
  for (const c of candidates) {
    try {
      return require.resolve(c);
    } catch {
      // next
    }
  }
  return null;
}

// "/spec/template/spec/containers/0/ports/0" -> dotted, containers named.
function prettyPath(obj, pointer) {
  const parts = pointer.split("/").filter((s) => s !== "").map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"));
  let out = "";
  let cur = obj;
  for (const part of parts) {
    if (Array.isArray(cur)) {
      const item = cur[Number(part)];
      const label = item && typeof item === "object" && typeof item.name === "string" ? item.name : part;
      out += `[${label}]`;
      cur = item;
    } else {
      out += (out ? "." : "") + part;
      cur = cur && typeof cur === "object" ? cur[part] : undefined;
    }
  }
  return out || "(object)";
}

// Dotted path with [i] -> the same with container names.
function namedPath(obj, dotted) {
  const pointer = "/" + dotted.replace(/\[(\d+)\]/g, ".$1").split(".").join("/");
  return prettyPath(obj, pointer);
}

function checkSchema(source, obj) {
  if (!obj || typeof obj !== "object" || !obj.apiVersion || !obj.kind) {
    report(source, obj, "(object)", "not a Kubernetes object (apiVersion and kind required)");
    return;
  }
  const file = modelFile(obj);
  if (!file) {
    report(source, obj, "apiVersion", `no schema known for ${obj.apiVersion} ${obj.kind}`);
    return;
  }
  const mod = require(file);
  const Model = mod[obj.kind];
  try {
    new Model(obj).validate();
  } catch (e) {
    if (!e.errors) throw e;
    const byPath = new Map();
    for (const err of e.errors) {
      if (err.keyword === "oneOf" || err.keyword === "anyOf") continue;
      let where = err.instancePath;
      let msg = err.message;
      if (err.keyword === "required") {
        where = `${where}/${err.params.missingProperty}`;
        msg = "required field missing";
      } else if (err.keyword === "enum") {
        msg = `must be one of ${err.params.allowedValues.join(", ")}`;
      }
      if (!byPath.has(where)) byPath.set(where, []);
      if (!byPath.get(where).includes(msg)) byPath.get(where).push(msg);
    }
    for (const [where, msgs] of byPath) {
      report(source, obj, prettyPath(obj, where), `schema: ${msgs.join(" or ")}`);
    }
  }
  const root = rootType(file.replace(/\.js$/, ".d.ts"), obj.kind);
  if (root) {
    for (const u of unknownFields(obj, root.type, root.file)) {
      report(source, obj, namedPath(obj, u.path), `unknown field "${u.field}"`);
    }
  }
}

// --- strata's rules -----------------------------------------------------------

// CLI11 style: --flag value or --flag=value; returns Map flag -> [values].
function parseArgs(args) {
  const flags = new Map();
  for (let i = 1; i < args.length; i++) {
    const a = String(args[i]);
    if (!a.startsWith("--")) continue;
    let name = a;
    let value = null;
    const eq = a.indexOf("=");
    if (eq > 0) {
      name = a.slice(0, eq);
      value = a.slice(eq + 1);
    } else if (i + 1 < args.length && !String(args[i + 1]).startsWith("--")) {
      value = String(args[++i]);
    }
    if (!flags.has(name)) flags.set(name, []);
    flags.get(name).push(value);
  }
  return flags;
}

function last(flags, name) {
  const v = flags.get(name);
  return v && v.length ? v[v.length - 1] : undefined;
}

function quantityNumber(q) {
  if (q === undefined || q === null) return NaN;
  return Number(String(q));
}

function podTemplate(obj) {
  if (!POD_KINDS.has(obj.kind)) return null;
  const t = obj.spec && obj.spec.template;
  return t && t.spec ? t : null;
}

function selectorMatches(selector, labels) {
  if (!selector || !labels) return false;
  const ml = selector.matchLabels || selector;
  const keys = Object.keys(ml);
  return keys.length > 0 && keys.every((k) => labels[k] === ml[k]);
}

function configMapsByName(objs) {
  const m = new Map();
  for (const o of objs) if (o && o.kind === "ConfigMap" && o.metadata) m.set(o.metadata.name, o);
  return m;
}

// The value of $(VAR) references: names a container defines.
function envNames(container, configMaps) {
  const names = new Set();
  for (const e of container.env || []) names.add(e.name);
  for (const ef of container.envFrom || []) {
    if (ef.configMapRef) {
      const cm = configMaps.get(ef.configMapRef.name);
      if (cm) for (const k of Object.keys(cm.data || {})) names.add((ef.prefix || "") + k);
    }
  }
  return names;
}

function checkPodWorkload(source, obj, objs, configMaps) {
  const tpl = podTemplate(obj);
  const spec = tpl.spec;
  const base = "spec.template.spec";
  const labels = (tpl.metadata && tpl.metadata.labels) || {};
  const volumes = new Map((spec.volumes || []).map((v) => [v.name, v]));

  // Pod-level: PDB, spread, security.
  if (obj.kind !== "Job" && obj.kind !== "DaemonSet") {
    const pdb = objs.find((o) => o && o.kind === "PodDisruptionBudget" && o.spec && selectorMatches(o.spec.selector, labels));
    if (!pdb) report(source, obj, "spec.template.metadata.labels", "no PodDisruptionBudget selects these pods");
    if (!(spec.topologySpreadConstraints || []).length) {
      report(source, obj, `${base}.topologySpreadConstraints`, "missing (spread the pods over nodes)");
    }
  }
  const podSc = spec.securityContext || {};

  const containers = spec.containers || [];
  containers.forEach((c, ci) => {
    const cpath = `${base}.containers[${c.name || ci}]`;
    // Resources.
    const res = c.resources || {};
    for (const kind of ["requests", "limits"]) {
      const r = res[kind];
      if (!r) {
        report(source, obj, `${cpath}.resources.${kind}`, "missing (cpu and memory required)");
        continue;
      }
      for (const k of ["cpu", "memory"]) {
        if (r[k] === undefined) report(source, obj, `${cpath}.resources.${kind}.${k}`, "missing");
      }
    }
    // Probes.
    for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      if (!c[probe]) report(source, obj, `${cpath}.${probe}`, "missing");
    }
    // Image.
    const image = c.image || "";
    const lastSegment = image.split("/").pop();
    if (!image) {
      report(source, obj, `${cpath}.image`, "missing");
    } else if (!image.includes("@sha256:") && !lastSegment.includes(":")) {
      report(source, obj, `${cpath}.image`, `"${image}" has no tag: pin one (kustomize edit set image)`);
    } else if (/:latest$/.test(image)) {
      report(source, obj, `${cpath}.image`, `"${image}": :latest is not a pinned tag`);
    }
    // Non-root.
    const sc = c.securityContext || {};
    if (!(sc.runAsNonRoot === true || (sc.runAsNonRoot === undefined && podSc.runAsNonRoot === true))) {
      report(source, obj, `${cpath}.securityContext.runAsNonRoot`, "must be true (here or in the pod's securityContext)");
    }

    const args = c.args || [];
    const command = args.length ? String(args[0]) : "";
    if (!STRATA_COMMANDS.has(command)) return;
    const flags = parseArgs(args);
    const gpuLimit = quantityNumber((res.limits || {})["nvidia.com/gpu"]);
    const gpuRequest = (res.requests || {})["nvidia.com/gpu"];
    const port = Number(last(flags, "--port") || DEFAULT_PORT);

    // $(VAR) references resolve.
    const defined = envNames(c, configMaps);
    args.forEach((a, ai) => {
      for (const m of String(a).matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g)) {
        if (!defined.has(m[1])) {
          report(source, obj, `${cpath}.args[${ai}]`, `$(${m[1]}) is not defined by the container's env or envFrom`);
        }
      }
    });

    // Probes ask the gRPC health service on the gRPC port.
    for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      const p = c[probe];
      if (!p) continue;
      if (!p.grpc) report(source, obj, `${cpath}.${probe}.grpc`, "missing: strata's probes use grpc.health.v1 on the gRPC port");
      else if (Number(p.grpc.port) !== port) report(source, obj, `${cpath}.${probe}.grpc.port`, `${p.grpc.port} is not --port ${port}`);
    }

    // GPUs.
    if (GPU_COMMANDS.has(command)) {
      if (!(gpuLimit >= 1)) {
        report(source, obj, `${cpath}.resources.limits.nvidia.com/gpu`, `missing: \`strata ${command}\` needs a GPU`);
      }
      if (gpuRequest !== undefined && quantityNumber(gpuRequest) !== gpuLimit) {
        report(source, obj, `${cpath}.resources.requests.nvidia.com/gpu`, "must equal the limit");
      }
      // A rank per GPU: fewer GPUs than ranks fails at start, more idle.
      const tp = Number(last(flags, "--tensor-parallel") || 1);
      if (gpuLimit >= 1 && tp !== gpuLimit) {
        report(source, obj, `${cpath}.args`,
          `--tensor-parallel ${tp} on a pod with ${gpuLimit} GPUs: strata runs a rank per GPU, so they must be equal`);
      }
      if (last(flags, "--backend") !== "cuda") {
        report(source, obj, `${cpath}.args`, `--backend is ${last(flags, "--backend") || "cpu (the default)"}, not cuda, on a GPU pod`);
      }
      // /dev/shm: memory-backed and sized.
      const shm = (c.volumeMounts || []).find((m) => m.mountPath === "/dev/shm");
      const shmVol = shm && volumes.get(shm.name);
      if (!shmVol || !shmVol.emptyDir || shmVol.emptyDir.medium !== "Memory" || !shmVol.emptyDir.sizeLimit) {
        report(source, obj, `${cpath}.volumeMounts`, "/dev/shm must be an emptyDir with medium Memory and a sizeLimit (UCX)");
      }
    } else if (gpuLimit > 0 || gpuRequest !== undefined) {
      report(source, obj, `${cpath}.resources.limits.nvidia.com/gpu`, `\`strata ${command}\` uses no GPU: request none`);
    }

    // The drain: SIGTERM, then --grace-seconds for in-flight requests.
    const grace = Number(last(flags, "--grace-seconds") || DEFAULT_GRACE_SECONDS);
    let preStop = 0;
    const ps = c.lifecycle && c.lifecycle.preStop;
    if (ps && ps.exec && ps.exec.command && ps.exec.command[0] === "sleep") preStop = Number(ps.exec.command[1]) || 0;
    if (ps && ps.sleep) preStop = Number(ps.sleep.seconds) || 0;
    const tgps = spec.terminationGracePeriodSeconds === undefined ? 30 : spec.terminationGracePeriodSeconds;
    const need = grace + preStop + DRAIN_MARGIN_SECONDS;
    if (!(tgps >= need)) {
      report(source, obj, `${base}.terminationGracePeriodSeconds`,
        `${tgps} is less than --grace-seconds ${grace} + preStop ${preStop} + ${DRAIN_MARGIN_SECONDS} s margin = ${need}`);
    }

    // Metrics: scraped where strata serves them.
    const metricsPort = last(flags, "--metrics-port");
    const ann = (tpl.metadata && tpl.metadata.annotations) || {};
    if (metricsPort === undefined || Number(metricsPort) < 0) {
      report(source, obj, `${cpath}.args`, "--metrics-port missing: strata serves no /metrics without it");
    } else {
      if (ann["prometheus.io/scrape"] !== "true") report(source, obj, "spec.template.metadata.annotations.prometheus.io/scrape", 'must be "true"');
      if (ann["prometheus.io/port"] !== String(metricsPort)) {
        report(source, obj, "spec.template.metadata.annotations.prometheus.io/port", `must be "${metricsPort}" (--metrics-port)`);
      }
      if (ann["prometheus.io/path"] !== "/metrics") report(source, obj, "spec.template.metadata.annotations.prometheus.io/path", 'must be "/metrics"');
      if (!(c.ports || []).some((p) => Number(p.containerPort) === Number(metricsPort))) {
        report(source, obj, `${cpath}.ports`, `no port ${metricsPort} (--metrics-port)`);
      }
    }
    if (!(c.ports || []).some((p) => Number(p.containerPort) === port)) {
      report(source, obj, `${cpath}.ports`, `no port ${port} (--port)`);
    }

    // Profiles: each --profile is a key of a mounted ConfigMap; an SSD tier
    // path is a writable volume.
    (flags.get("--profile") || []).forEach((file) => {
      const mount = (c.volumeMounts || []).find((m) => file.startsWith(m.mountPath.replace(/\/?$/, "/")));
      const vol = mount && volumes.get(mount.name);
      if (!vol || !vol.configMap) {
        report(source, obj, `${cpath}.args`, `--profile ${file} is not in a mounted ConfigMap`);
        return;
      }
      const cm = configMaps.get(vol.configMap.name);
      const key = file.slice(mount.mountPath.replace(/\/?$/, "/").length);
      if (!cm || !cm.data || cm.data[key] === undefined) {
        report(source, obj, `${cpath}.args`, `--profile ${file}: ConfigMap ${vol.configMap.name} has no key ${key}`);
        return;
      }
      let profile;
      try {
        profile = YAML.parse(cm.data[key]);
      } catch (e) {
        report(source, obj, `${cpath}.args`, `--profile ${file}: not YAML (${e.message.split("\n")[0]})`);
        return;
      }
      // The router loads profiles for their names only: no tiers.
      const ssd = profile && profile.tiers && profile.tiers.ssd_path;
      if (ssd && GPU_COMMANDS.has(command)) {
        const m = (c.volumeMounts || []).find((vm) => (ssd + "/").startsWith(vm.mountPath.replace(/\/?$/, "/")));
        if (!m || m.readOnly) {
          report(source, obj, `${cpath}.volumeMounts`, `${key}'s tiers.ssd_path ${ssd} needs a writable volume mounted there`);
        }
      }
    });

    // The router finds workers through headless Services.
    if (command === "router") {
      const roles = new Set();
      (flags.get("--workers") || []).forEach((w) => {
        const m = /^(?:dns:\/\/\/)?([^:/.]+)(?:\.[^:]*)?:(\d+)$/.exec(w || "");
        if (!m) {
          report(source, obj, `${cpath}.args`, `--workers ${w}: expected dns:///SERVICE:PORT`);
          return;
        }
        const svc = objs.find((o) => o && o.kind === "Service" && o.metadata.name === m[1]);
        if (!svc) {
          report(source, obj, `${cpath}.args`, `--workers ${w}: no Service ${m[1]}`);
          return;
        }
        if (svc.spec.clusterIP !== "None") report(source, svc, "spec.clusterIP", `must be None: the router resolves ${m[1]} to every pod`);
        if (!(svc.spec.ports || []).some((p) => Number(p.port) === Number(m[2]))) report(source, svc, "spec.ports", `no port ${m[2]} (router --workers)`);
        for (const o of objs) {
          const t = o && podTemplate(o);
          if (!t || !selectorMatches(svc.spec.selector, t.metadata && t.metadata.labels)) continue;
          for (const wc of t.spec.containers || []) if (wc.args && wc.args.length) roles.add(String(wc.args[0]));
        }
      });
      for (const role of ["prefill", "decode"]) {
        if (!roles.has(role)) report(source, obj, `${cpath}.args`, `no --workers Service selects ${role} pods`);
      }
    }
  });
}

// The router and the workers of one rendering must agree on the context
// length and the profiles (a request the router admits must fit a worker).
function checkConsistency(source, objs) {
  const seen = [];
  for (const o of objs) {
    const t = o && o.kind && podTemplate(o);
    if (!t) continue;
    (t.spec.containers || []).forEach((c) => {
      const args = (c.args || []).map(String);
      if (!STRATA_COMMANDS.has(args[0])) return;
      const flags = parseArgs(args);
      seen.push({ o, c, context: last(flags, "--max-context") || "(default)",
        profiles: (flags.get("--profile") || []).map((f) => path.basename(f)).sort().join(", ") });
    });
  }
  for (const s of seen.slice(1)) {
    const cpath = `spec.template.spec.containers[${s.c.name}].args`;
    if (s.context !== seen[0].context) {
      report(source, s.o, cpath, `--max-context ${s.context} differs from ${seen[0].o.metadata.name}'s ${seen[0].context}`);
    }
    if (s.profiles !== seen[0].profiles) {
      report(source, s.o, cpath, `--profile files (${s.profiles}) differ from ${seen[0].o.metadata.name}'s (${seen[0].profiles})`);
    }
  }
}

// --- main --------------------------------------------------------------------

function main(argv) {
  let profilesDir = null;
  const inputs = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--profiles-dir") profilesDir = argv[++i];
    else {
      const eq = argv[i].indexOf("=");
      inputs.push(eq > 0 ? [argv[i].slice(0, eq), argv[i].slice(eq + 1)] : [argv[i], argv[i]]);
    }
  }
  if (!inputs.length) {
    console.error("usage: check.js [--profiles-dir DIR] NAME=RENDERED.yaml...");
    return 2;
  }
  let objects = 0;
  for (const [source, file] of inputs) {
    let objs;
    try {
      objs = YAML.parseAllDocuments(fs.readFileSync(file, "utf8")).map((d) => {
        if (d.errors.length) throw new Error(d.errors[0].message);
        return d.toJS();
      }).filter((o) => o !== null);
    } catch (e) {
      problems.push(`${source}: -: (yaml): ${e.message.split("\n")[0]}`);
      continue;
    }
    objects += objs.length;
    const configMaps = configMapsByName(objs);
    for (const obj of objs) {
      checkSchema(source, obj);
      if (obj && obj.kind && podTemplate(obj)) checkPodWorkload(source, obj, objs, configMaps);
    }
    checkConsistency(source, objs);
    if (profilesDir) {
      const want = fs.readdirSync(profilesDir).filter((f) => f.endsWith(".yaml")).sort();
      const cm = objs.find((o) => o && o.kind === "ConfigMap" && /^strata-profiles(-|$)/.test(o.metadata.name));
      if (!cm) {
        problems.push(`${source}: ConfigMap/strata-profiles: (object): missing`);
      } else {
        const have = Object.keys(cm.data || {}).sort();
        for (const f of want) if (!have.includes(f)) report(source, cm, `data.${f}`, `missing: add ${f} to ${path.join(profilesDir, "Kustomization")}`);
      }
    }
  }
  for (const p of problems) console.log(p);
  if (problems.length) {
    console.log(`${problems.length} problem(s) in ${inputs.length} rendering(s)`);
    return 1;
  }
  console.log(`${objects} objects in ${inputs.length} rendering(s): ok`);
  return 0;
}

process.exitCode = main(process.argv.slice(2));

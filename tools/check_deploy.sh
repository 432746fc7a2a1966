#!/usr/bin/env bash
# Validates strata's Kubernetes deployment (deploy/):
#  - renders every overlay of deploy/k8s/overlays, alone and with each
#    component of deploy/k8s/components, with `kubectl kustomize`;
#  - checks every rendered object against the Kubernetes OpenAPI schema of
#    its kind, for fields its kind does not have, and against strata's own
#    rules (tools/deploy-check/check.js: resources, probes, pinned images,
#    GPUs, the drain, /dev/shm, the SSD volume, profiles, scraping,
#    discovery);
#  - runs `strata profile check` on deploy/profiles/*.yaml against
#    Llama-3-8B's shapes at the manifests' context length;
#  - checks that tools/packages/runtime.txt (the container image's
#    libraries) names every Debian package the built binary loads from.
# Each problem is one line naming the rendering, object and field.
#
# Usage: tools/check_deploy.sh [--self-test] [STRATA_BINARY]
#   --self-test: check that each broken fixture of tests/deploy/ fails with
#   the lines of its expect.txt, and that the real manifests pass.
# STRATA_BINARY defaults to build/cli/strata (tools/test.sh builds it first).
#
# Needs kubectl and Node.js (18 or later). Node packages are installed from
# tools/deploy-check/package-lock.json into tools/deploy-check/node_modules,
# again only when the lock file changes. Without kubectl (Debian 12 has no
# package for it) the check says so and is skipped: exit 0, or 77 (ctest's
# skip) with --self-test.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=check
if [ "${1:-}" = --self-test ]; then
  mode=self-test
  shift
fi
strata=${1:-build/cli/strata}
skip_status=0
[ "$mode" = self-test ] && skip_status=77

sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
apt_install() {  # installs Debian packages that have an install candidate
  local want=()
  for p in "$@"; do
    apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [^(]' && want+=("$p")
  done
  [ ${#want[@]} -eq 0 ] && return 1
  echo "check_deploy: installing ${want[*]}" >&2
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
}

if ! command -v kubectl >/dev/null; then
  apt_install kubectl || true
fi
if ! command -v kubectl >/dev/null; then
  echo "check_deploy: SKIPPED: kubectl is not installed (and no Debian package provides it);" \
    "install kubectl to validate deploy/k8s" >&2
  exit "$skip_status"
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt_install nodejs npm || true
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "check_deploy: Node.js and npm are needed (apt-get install nodejs npm)" >&2
  exit 1
fi

# Node packages, pinned by the lock file; reinstalled only when it changes.
checker=tools/deploy-check
bash "$checker/install.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# render NAME DIR [COMPONENT_DIR]: kubectl kustomize into $work/NAME.yaml.
render() {
  local name=$1 dir=$2 component=${3:-} target=$2
  if [ -n "$component" ]; then
    target=$work/$name.kustomization
    mkdir -p "$target"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s\n' \
      "$(realpath --relative-to="$target" "$dir")" "$(realpath --relative-to="$target" "$component")" \
      >"$target/kustomization.yaml"
  fi
  if ! kubectl kustomize "$target" >"$work/$name.yaml" 2>"$work/$name.err"; then
    echo "$name: kubectl kustomize $dir${component:+ + $component} failed:" >&2
    sed 's/^/  /' "$work/$name.err" >&2
    return 1
  fi
}

renderings=()
render_all() {
  local overlay component name
  for overlay in deploy/k8s/overlays/*/; do
    overlay=${overlay%/}
    name=$(basename "$overlay")
    render "$name" "$overlay"
    renderings+=("$name=$work/$name.yaml")
    for component in deploy/k8s/components/*/; do
      [ -d "$component" ] || continue
      component=${component%/}
      render "$name+$(basename "$component")" "$overlay" "$component"
      renderings+=("$name+$(basename "$component")=$work/$name+$(basename "$component").yaml")
    done
  done
}

context=$(sed -n 's/^ *- STRATA_MAX_CONTEXT=\([0-9]*\).*/\1/p' deploy/k8s/base/kustomization.yaml)

check_profiles() {
  if [ ! -x "$strata" ]; then
    echo "check_deploy: $strata not found: build strata first (tools/build.sh)" >&2
    return 1
  fi
  local out
  if ! out=$("$strata" profile check deploy/profiles/*.yaml --dummy-weights llama-3-8b \
    --max-context "${context:-32768}" 2>&1); then
    echo "$out" | grep -v ': ok' | sed 's/^/strata profile check: /'
    return 1
  fi
}

# Every library the binary (and the sentencepiece shim) loads from a Debian
# package is in tools/packages/runtime.txt, which the image installs.
check_runtime_packages() {
  command -v dpkg >/dev/null && [ -x "$strata" ] || return 0
  local files=("$strata") shim listed missing=() soname path pkg
  shim=$(dirname "$strata")/../engine/libstrata_sentencepiece_shim.so
  [ -f "$shim" ] && files+=("$shim")
  listed=$(sed 's/#.*//' tools/packages/runtime.txt | tr -s ' \n' '\n')
  for f in "${files[@]}"; do
    for soname in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      path=$(ldd "$f" | awk -v s="$soname" '$1 == s && $3 ~ /^\// {print $3}')
      [ -z "$path" ] && continue
      pkg=$(dpkg -S "$(readlink -f "$path")" 2>/dev/null | head -1 | cut -d: -f1) || true
      # Not from a package (cuBLAS: the image copies it), or always there.
      case $pkg in "" | libc6 | libgcc-s1) continue ;; esac
      grep -qx -- "$pkg" <<<"$listed" || missing+=("$pkg ($soname, loaded by $(basename "$f"))")
    done
  done
  if [ ${#missing[@]} -gt 0 ]; then
    printf 'tools/packages/runtime.txt: missing %s\n' "${missing[@]}"
    return 1
  fi
}

status=0
if [ "$mode" = check ]; then
  render_all || status=1
  node "$checker/check.js" --profiles-dir deploy/profiles "${renderings[@]}" || status=1
  check_profiles || status=1
  check_runtime_packages || status=1
  profiles=(deploy/profiles/*.yaml)
  [ $status -eq 0 ] && echo "check_deploy: ok (${#renderings[@]} renderings, ${#profiles[@]} profiles)"
  exit $status
fi

# --self-test: the real manifests pass, and every fixture fails naming what
# its expect.txt says.
render_all
node "$checker/check.js" --profiles-dir deploy/profiles "${renderings[@]}" >"$work/real.out" || {
  echo "self-test: the manifests of deploy/k8s do not pass:" >&2
  cat "$work/real.out" >&2
  exit 1
}
cases=0
for case in tests/deploy/*/; do
  case=${case%/}
  name=$(basename "$case")
  out=$work/$name.out
  rc=0
  if [ -f "$case/kustomization.yaml" ]; then
    render "$name" "$case"
    node "$checker/check.js" "$name=$work/$name.yaml" >"$out" 2>&1 || rc=$?
    want_rc=1
  elif [ -f "$case/profile.yaml" ]; then
    "$strata" profile check "$case/profile.yaml" >"$out" 2>&1 || rc=$?
    want_rc=2
  else
    echo "self-test: $case has neither kustomization.yaml nor profile.yaml" >&2
    status=1
    continue
  fi
  cases=$((cases + 1))
  if [ "$rc" -ne "$want_rc" ]; then
    echo "self-test: $name: exit status $rc, expected $want_rc; output:" >&2
    sed 's/^/  /' "$out" >&2
    status=1
  fi
  while IFS= read -r line || [ -n "$line" ]; do
    [ -z "$line" ] && continue
    if ! grep -qF -- "$line" "$out"; then
      echo "self-test: $name: expected a line containing: $line" >&2
      echo "  got:" >&2
      sed 's/^/    /' "$out" >&2
      status=1
    fi
  done <"$case/expect.txt"
done
[ $status -eq 0 ] && echo "check_deploy self-test: ok ($cases broken fixtures rejected as expected)"
exit $status

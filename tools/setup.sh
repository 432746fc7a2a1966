#!/usr/bin/env bash
# Installs the Debian 12 packages strata's build and tests need.
# Idempotent: does nothing (and prints nothing) when everything is present.
set -euo pipefail

# The package lists live in tools/packages/ (build.txt: the toolchain and
# -dev packages; runtime.txt: the libraries the binary loads, which
# deploy/Dockerfile's runtime stage installs from the same file).
packages=()
for list in build.txt runtime.txt; do
  while IFS= read -r line || [ -n "$line" ]; do
    read -ra words <<<"${line%%#*}"
    packages+=(${words[@]+"${words[@]}"})
  done <"$(dirname "$0")/packages/$list"
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "strata setup: installing ${missing[*]}" >&2
sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

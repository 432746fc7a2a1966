#!/usr/bin/env bash
# Installs the checker's Node packages (package-lock.json, pinned) into
# tools/deploy-check/node_modules, again only when the lock file changes.
# Safe to run concurrently (ctest -j): one install at a time.
set -euo pipefail
cd "$(dirname "$0")"
stamp=node_modules/.strata-lock-sha256
sum=$(sha256sum package-lock.json | cut -d' ' -f1)
[ "$(cat "$stamp" 2>/dev/null)" = "$sum" ] && exit 0
exec 9>"${TMPDIR:-/tmp}/strata-deploy-check-install.lock"
flock 9
[ "$(cat "$stamp" 2>/dev/null)" = "$sum" ] && exit 0
npm ci --no-audit --no-fund --loglevel=error >/dev/null
echo "$sum" >"$stamp"

#!/usr/bin/env bash
# The tests: provision, lint, check the pack imports into ComfyUI, then the browser tier (ComfyUI's
# frontend in Debian's headless Chromium, installed when missing), the unit tier (host-free, once)
# and the comfy tier. When ../shared/hosts/ holds newer ComfyUI trees (comfyui-*.tar.gz), each gets
# its own virtual environment and the import check, browser and comfy tiers again, plus the browser
# tier on the newest frontend from PyPI. Every tier runs to the end; the exit code is non-zero if any
# failed. Extra arguments go to one pytest run instead (e.g. `bash scripts/test.sh -m unit -x`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/tiers.sh
SHARED_HOSTS=${VELOX_SHARED_HOSTS:-$ROOT/../shared/hosts}
NEWEST_FRONTEND=${VELOX_NEWEST_FRONTEND:-1.58.1}

HOST=$(bash scripts/provision.sh | tail -n 1)
VENV=${VELOX_VENV:-$ROOT/.venv}
export COMFYUI_PATH=$HOST
# pytest runs under -P, so the repository root is never on sys.path: the pack's folders `kernels`,
# `models`, `nodes`... would shadow PyPI packages of the same names (tests/conftest.py guards too).
pytest_in() { local venv=$1; shift; "$venv/bin/python" -P -m pytest "$@"; }
host_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py"; }

echo "== ruff"
"$VENV/bin/ruff" check .

import_check() {  # import_check HOST VENV: ComfyUI loads the pack without IMPORT FAILED
  local host=$1 venv=$2 log; log=$(mktemp)
  (cd "$host" && "$venv/bin/python" main.py --cpu --quick-test-for-ci > "$log" 2>&1) || { cat "$log"; return 1; }
  if grep "IMPORT FAILED" "$log" | grep -q "custom_nodes/velox"; then
    grep -B 30 "IMPORT FAILED" "$log"; echo "ComfyUI logged IMPORT FAILED for Velox" >&2; return 1
  fi
}
echo "== ComfyUI imports the pack"
import_check "$HOST" "$VENV"

echo "== Chromium for the browser tier"
CHROMIUM=${VELOX_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
  echo "$CHROMIUM"
else
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "installing Debian's chromium"
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } > /dev/null 2>&1 \
      || echo "could not install chromium: the browser tier will skip" >&2
  else
    echo "no $CHROMIUM and no apt-get as root: the browser tier will skip" >&2
  fi
fi

if [ $# -gt 0 ]; then
  echo "== pytest $*"
  pytest_in "$VENV" -m "not gpu" -q "$@"
  exit
fi

frontend_root() {  # the static folder of comfyui-frontend-package==$1, installed beside the hosts
  local target=$ROOT/.host/frontend-$1
  if [ ! -d "$target/comfyui_frontend_package/static" ]; then
    "$VENV/bin/python" -m pip install -qq --no-deps --target "$target" "comfyui-frontend-package==$1" >&2
  fi
  echo "$target/comfyui_frontend_package/static"
}

newer_host() {  # newer_host TARBALL: the tiers that depend on the host, on a second host
  local tarball=$1 name venv host
  name=$(basename "$tarball" .tar.gz)
  venv=$ROOT/.venv-$name
  # COMFYUI_PATH (exported above for the default host) would win over the tarball in provision.sh
  host=$(env -u COMFYUI_PATH VELOX_VENV="$venv" VELOX_HOST_TARBALL="$tarball" bash scripts/provision.sh | tail -n 1) \
    || return 1
  echo "== $name: ComfyUI $(host_version "$host") at $host"
  run_tier "ComfyUI imports the pack ($name)" import_check "$host" "$venv"
  run_tier "browser tier ($name)" env COMFYUI_PATH="$host" "$venv/bin/python" -P -m pytest -m browser -q -rs tests/browser
  local front; front=$(frontend_root "$NEWEST_FRONTEND") || { FAILED_TIERS+=("frontend $NEWEST_FRONTEND install"); return; }
  # its job and asset panels need a newer server's API: the canvas image is checked, not the sidebar
  run_tier "browser tier ($name, frontend $NEWEST_FRONTEND)" env COMFYUI_PATH="$host" VELOX_FRONT_END_ROOT="$front" \
    VELOX_CHECK_OUTPUT_SIDEBAR=0 \
    "$venv/bin/python" -P -m pytest -m browser -q -rs tests/browser
  run_tier "comfy tier ($name)" env COMFYUI_PATH="$host" "$venv/bin/python" -P -m pytest -m "comfy and not gpu" -q
}

run_tier "browser tier (ComfyUI $(host_version "$HOST"), its frontend in headless Chromium)" pytest_in "$VENV" -m browser -q -rs tests/browser
run_tier "unit and fuzz tiers (host-free)" pytest_in "$VENV" -m "(unit or fuzz) and not gpu" -q
for tarball in "$SHARED_HOSTS"/comfyui-*.tar.gz; do
  [ -f "$tarball" ] || continue
  newer_host "$tarball" || FAILED_TIERS+=("provisioning $(basename "$tarball")")
done
# the comfy tier of the default host last, so the run closes on the summary of the largest tier
run_tier "comfy tier (ComfyUI $(host_version "$HOST"))" pytest_in "$VENV" -m "comfy and not gpu" -q
finish_tiers

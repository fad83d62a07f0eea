#!/usr/bin/env bash
# The tests: provision, lint, check the pack imports into ComfyUI, then the browser tier (ComfyUI's
# frontend in Debian's headless Chromium, installed when missing), then the unit and comfy tiers.
# Extra arguments go to one pytest run instead (e.g. `bash scripts/test.sh -m unit -x`).
# Every tier runs to the end even when an earlier one fails; the exit code is non-zero if any did.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HOST=$(bash scripts/provision.sh | tail -n 1)
VENV=${VELOX_VENV:-$ROOT/.venv}
export COMFYUI_PATH=$HOST
# Python never puts the repository root on sys.path (-P, and PYTHONSAFEPATH for children): the
# pack's folders `kernels`, `models`, `nodes`... would shadow PyPI packages of the same names.
export PYTHONSAFEPATH=1
PYTEST=("$VENV/bin/python" -P -m pytest)

echo "== ruff"
"$VENV/bin/ruff" check .

echo "== ComfyUI imports the pack"
log=$(mktemp)
(cd "$HOST" && "$VENV/bin/python" main.py --cpu --quick-test-for-ci > "$log" 2>&1) || { cat "$log"; exit 1; }
if grep "IMPORT FAILED" "$log" | grep -q "custom_nodes/velox"; then
  grep -B 30 "IMPORT FAILED" "$log"; echo "ComfyUI logged IMPORT FAILED for Velox" >&2; exit 1
fi

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
  "${PYTEST[@]}" -m "not gpu" -q "$@"
  exit
fi
failed=()
# the browser tier first, so the run closes on the summary of the largest tier
echo "== pytest (browser tier: ComfyUI's frontend in headless Chromium)"
"${PYTEST[@]}" -m browser -q -rs tests/browser || failed+=("browser")
echo "== pytest (unit + comfy tiers)"
"${PYTEST[@]}" -m "not gpu and not browser" -q || failed+=("unit + comfy")
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED tiers: ${failed[*]}" >&2
  exit 1
fi

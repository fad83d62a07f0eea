#!/usr/bin/env bash
# The tests: provision, lint, check the pack imports into ComfyUI, then the unit and comfy tiers.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m unit -x`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HOST=$(bash scripts/provision.sh | tail -n 1)
VENV=${VELOX_VENV:-$ROOT/.venv}
export COMFYUI_PATH=$HOST

echo "== ruff"
"$VENV/bin/ruff" check .

echo "== ComfyUI imports the pack"
log=$(mktemp)
(cd "$HOST" && "$VENV/bin/python" main.py --cpu --quick-test-for-ci > "$log" 2>&1) || { cat "$log"; exit 1; }
if grep "IMPORT FAILED" "$log" | grep -q "custom_nodes/velox"; then
  grep -B 30 "IMPORT FAILED" "$log"; echo "ComfyUI logged IMPORT FAILED for Velox" >&2; exit 1
fi

echo "== pytest (unit + comfy tiers)"
"$VENV/bin/python" -m pytest -m "not gpu and not browser" -q "$@"

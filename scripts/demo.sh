#!/usr/bin/env bash
# The demo: run the sana_t2i example workflow headless and write its PNG to ./output/.
# Real weights in ComfyUI's models/ folders win; otherwise the tiny demo checkpoints are used.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HOST=$(bash scripts/provision.sh | tail -n 1)
PY=${VELOX_VENV:-$ROOT/.venv}/bin/python
DEMO_MODELS=$ROOT/.cache/demo_models
"$PY" scripts/make_demo_models.py --models-dir "$DEMO_MODELS"
"$PY" scripts/run_workflow.py "example_workflows/api/${1:-sana_t2i}.json" \
  --comfyui "$HOST" --extra-models "$DEMO_MODELS" --output "$ROOT/output"

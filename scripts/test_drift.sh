#!/usr/bin/env bash
# Drift check: provision a separate environment (.venv-drift) with the NEWEST release of every
# unpinned dependency (requirements-lock.txt ignored; torch stays the host's), then run the unit
# and fuzz tiers and the comfy tier there. This finds the next incompatible release before a user does.
#   bash scripts/test_drift.sh               # report only
#   bash scripts/test_drift.sh --update-lock # and, when it passes, write the versions to the lock
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export VELOX_VENV=${VELOX_DRIFT_VENV:-$ROOT/.venv-drift} VELOX_UNPINNED=1
HOST=$(bash scripts/provision.sh | tail -n 1)
export COMFYUI_PATH=$HOST
echo "== newest versions in $VELOX_VENV"
"$VELOX_VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(transformers|diffusers|safetensors|gguf|numpy|huggingface.hub|kernels|tokenizers|sentencepiece|protobuf|einops|pytest)=='
echo "== pytest (unit, fuzz and comfy tiers, newest versions)"
"$VELOX_VENV/bin/python" -P -m pytest -m "(unit or fuzz or comfy) and not gpu" -q
if [ "${1:-}" = --update-lock ]; then
  bash scripts/lock_requirements.sh "$VELOX_VENV"
fi

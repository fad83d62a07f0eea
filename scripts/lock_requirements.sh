#!/usr/bin/env bash
# Write requirements-lock.txt from a provisioned, passing environment (default .venv). Left out:
# torch / torchvision / torchaudio (the host's), their CUDA wheels and triton, and the comfyui-*
# packages, which the host's own requirements.txt pins to its version.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$ROOT/.venv}
{
  echo "# The test environment, resolved and passing ($(date +%F), $("$VENV/bin/python" -V)): scripts/provision.sh"
  echo "# installs with '-c requirements-lock.txt'. Written by scripts/lock_requirements.sh; see its header"
  echo "# for what is left out."
  "$VENV/bin/python" -m pip freeze --exclude-editable \
    | grep -viE '^(nvidia-|cuda-|torch==|torchvision==|torchaudio==|triton==|comfyui)'
} > "$ROOT/requirements-lock.txt"
echo "wrote $ROOT/requirements-lock.txt"

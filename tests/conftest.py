"""Shared test setup.

The repository root is the pack; tests import it as the package ``velox`` (ComfyUI imports
it under a path-derived name, so the pack uses relative imports only). ComfyUI's modules are
reachable when ``COMFYUI_PATH`` (or the provisioned ``.host/ComfyUI``) exists; they are put
into CPU mode before anything imports ``comfy``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _is_repository_root(entry: str) -> bool:
    return Path(entry or os.getcwd()).resolve() == ROOT


# The pack's folders (kernels, models, nodes, loaders, host, sampling) are also PyPI names:
# transformers imports Hugging Face's `kernels` when installed. `python -m pytest` puts the
# repository root first on sys.path, where they would shadow those packages, so the root is
# taken off (scripts/test.sh also starts Python with -P), and `python -c` children started from
# the root inherit the rule (the ComfyUI server, which needs its own folder, drops it).
sys.path[:] = [entry for entry in sys.path if not _is_repository_root(entry)]
os.environ["PYTHONSAFEPATH"] = "1"
sys.path.insert(0, str(ROOT / "scripts"))

from velox_import import register_pack  # noqa: E402


def comfyui_path() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    candidate = Path(env) if env else ROOT / ".host" / "ComfyUI"
    return candidate if (candidate / "main.py").is_file() else None


def _boot_comfy_on_cpu() -> bool:
    """Make ``import comfy.*`` work in this process, on the CPU, once."""
    if "comfy.model_management" in sys.modules:
        return True
    host = comfyui_path()
    if host is None:
        return False
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    import comfy.options

    comfy.options.enable_args_parsing()
    saved = sys.argv
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = saved
    return True


register_pack()


@pytest.fixture(scope="session")
def comfy_host() -> Path:
    """ComfyUI's modules, importable and on the CPU (skips when no host is provisioned)."""
    if not _boot_comfy_on_cpu():
        pytest.skip("no ComfyUI host: run scripts/provision.sh or set COMFYUI_PATH")
    return comfyui_path()

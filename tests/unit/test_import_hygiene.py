"""The pack's folder names never shadow installed packages while tests run.

`kernels`, `models`, `nodes`, `loaders`, `host` and `sampling` are generic names (Hugging Face's
`kernels` is imported by transformers when installed). The pack is imported only as `velox.*`,
as ComfyUI imports it, so none of its folders may be reachable as a top-level module.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDERS = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def _is_pack_folder(spec) -> bool:
    """Whether a top-level module spec is one of the pack's own folders (not .venv's packages)."""
    locations = [spec.origin] if spec.origin else []
    locations += list(spec.submodule_search_locations or [])
    folders = {ROOT / name for name in PACK_FOLDERS}
    return any(folders & {Path(loc).resolve(), *Path(loc).resolve().parents} for loc in locations if loc)


def test_the_pack_has_the_generic_folder_names_this_test_guards():
    assert {"kernels", "models", "nodes", "loaders", "host", "sampling"} <= set(PACK_FOLDERS)


def test_repository_root_is_not_on_sys_path():
    on_path = [entry for entry in sys.path if Path(entry or os.getcwd()).resolve() == ROOT]
    assert on_path == [], f"the repository root is on sys.path as {on_path}"


@pytest.mark.parametrize("name", PACK_FOLDERS)
def test_no_pack_folder_resolves_as_a_top_level_module(name):
    spec = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
    assert spec is None or not _is_pack_folder(spec), f"`import {name}` finds the pack's folder"


def test_installed_hugging_face_kernels_is_the_one_imported():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    import kernels

    assert not _is_pack_folder(kernels.__spec__)
    assert hasattr(kernels, "__version__") or hasattr(kernels, "get_kernel")


def test_subprocesses_started_in_the_repository_root_do_not_see_pack_folders():
    """Tests start Python children (`python -c`, scripts) from the root; '' must not become the root."""
    code = ("import importlib.util, sys\n"
            "specs = {n: importlib.util.find_spec(n) for n in sys.argv[2:]}\n"
            "print(sorted(n for n, s in specs.items() if s and (s.origin or '').startswith(sys.argv[1] + n)))")
    result = subprocess.run([sys.executable, "-c", code, f"{ROOT}/", *PACK_FOLDERS], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout

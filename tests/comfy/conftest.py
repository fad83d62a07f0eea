"""Comfy tier: one real ComfyUI server per session, on tiny demo checkpoints plus bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_client import ComfyServer  # noqa: E402

BAD_FILES = {
    "diffusion_models": ["broken_truncated.safetensors", "needs_pickle.pth", "wan_t2v_tiny.safetensors"],
    "text_encoders": ["gemma_without_tokenizer/"],
}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/comfy/" in str(item.fspath):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, comfy_host) -> Path:
    target = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_models.py"), "--models-dir", str(target),
                    "--with-bad-files"], check=True)
    return target


@pytest.fixture(scope="session")
def server(comfy_host, models_dir):
    with ComfyServer(comfy_host, extra_models=models_dir) as running:
        yield running

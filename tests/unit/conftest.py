"""Unit tier: host-free tests (models, kernels, loaders, samplers), marked ``unit``.

A test here that needs ComfyUI's modules asks for the ``comfy_host`` fixture and is marked
``comfy`` instead, so ``pytest -m unit`` runs without a ComfyUI host or its requirements.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/unit/" not in str(item.fspath).replace(os.sep, "/"):
            continue
        if "comfy_host" in item.fixturenames:
            item.add_marker(pytest.mark.comfy)
        elif item.get_closest_marker("fuzz") is None:  # deep fuzzing is its own host-free tier
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Quantizers run many small ops; on a busy 2-core runner two OpenMP threads spin-wait on
    each other (measured 10-25x slower), one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_kernel_copy(kernel: str, module_name: str | None = None) -> ModuleType:
    """A fresh copy of ``kernels/<kernel>.py``, decorated under the current environment."""
    name = module_name or f"velox.kernels._{kernel}_copy"
    spec = importlib.util.spec_from_file_location(name, KERNELS / f"{kernel}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interpreted_copy(kernel: str) -> ModuleType:
    """A copy of ``kernels/<kernel>.py`` decorated with TRITON_INTERPRET=1 (runs on CPU tensors)."""
    pytest.importorskip("triton")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return load_kernel_copy(kernel, f"velox.kernels._{kernel}_interpreted")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(scope="session")
def interpreted_kernel():
    """``interpreted_kernel("int8_gemm_triton")``: the kernel file under the Triton interpreter."""
    return _interpreted_copy


@pytest.fixture
def count_tensor_loads(monkeypatch):
    """``count_tensor_loads(module)``: wrap ``module.open_checkpoint`` so every tensor load is recorded
    by name (the converters stream a checkpoint; the tests check each tensor is read once, in order)."""

    def install(module) -> list[str]:
        loads: list[str] = []
        opened = module.open_checkpoint

        def counting(path, component):
            checkpoint = opened(path, component)
            for name, load in list(checkpoint.loaders.items()):
                checkpoint.loaders[name] = (lambda n=name, f=load: loads.append(n) or f())
            return checkpoint

        monkeypatch.setattr(module, "open_checkpoint", counting)
        return loads

    return install

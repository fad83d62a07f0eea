"""Shared helpers of the GPU benchmarks: pack import, ComfyUI boot, CUDA-event timing."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from velox_import import register_pack  # noqa: E402,F401  (re-exported for the benches)


def boot_comfy(comfyui: str | None = None) -> None:
    """Make ComfyUI's modules importable in this process (on the GPU when there is one)."""
    host = Path(comfyui or os.environ.get("COMFYUI_PATH") or ROOT / ".host" / "ComfyUI")
    sys.path.insert(0, str(host))
    import comfy.options

    comfy.options.enable_args_parsing()
    saved = sys.argv
    sys.argv = [saved[0]] + ([] if torch.cuda.is_available() else ["--cpu"])
    try:
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
    finally:
        sys.argv = saved
    import_stubbing_missing("comfy_api.latest")  # so that every later import finds its optional packages


class _StubModule(types.ModuleType):
    """An importable package whose every attribute is a MagicMock."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return mock.MagicMock(name=f"{self.__name__}.{attr}")


def import_stubbing_missing(name: str, attempts: int = 10):
    """Import ``name`` (e.g. ``comfy_extras.nodes_wan``), standing in empty modules for optional
    packages the device lacks (PyAV, needed by core's video types only for video files)."""
    for _ in range(attempts):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing = error.name
            if not missing or missing in sys.modules:
                raise
            print(f"bench: stubbing missing module {missing}", flush=True)
            stub = _StubModule(missing)
            stub.__path__ = []
            stub.__spec__ = importlib.machinery.ModuleSpec(missing, None, is_package=True)
            sys.modules[missing] = stub
    return importlib.import_module(name)


def cuda_time(fn: Callable[[], object], warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after ``warmup``, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def wall_time(fn: Callable[[], object], warmup: int = 1, repeat: int = 3) -> float:
    """Median wall-clock seconds (for whole pipelines that sync on their own)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def emit(record: dict, out_dir: str | None = None) -> None:
    """Print one result line and append it to $OUT/results.jsonl when OUT is set."""
    line = json.dumps(record)
    print(line, flush=True)
    target = out_dir or os.environ.get("OUT")
    if target:
        with open(Path(target) / "results.jsonl", "a") as f:
            f.write(line + "\n")

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


# ----------------------------------------------------------------------------------------------
# the tiny LTX-2 video VAE (SANA-Video 720p's): test_ltx2_vae.py, test_sana_video_nodes.py
# ----------------------------------------------------------------------------------------------


def tiny_ltx2_vae_config() -> dict:
    """The release's block types, causality and padding (LTX2_RELEASE), shrunk: widths 128 / 256, one
    ResNet a block. decoder_block_out_channels (128, 128, 256) with factors (1, 1, 2): the first upsampler
    halves 256 -> 128 channels as the release's do, the other two keep 128."""
    from velox.loaders.ltx2_vae_keys import LTX2_RELEASE

    return {
        "latent_channels": 128,
        "block_out_channels": (128, 128, 128, 256),
        "layers_per_block": (1, 1, 1, 1, 1),
        "decoder_block_out_channels": (128, 128, 256),
        "decoder_layers_per_block": (1, 1, 1, 1),
        "upsample_factor": (1, 1, 2),
        "decoder_inject_noise": (False, False, False, False),
        # as the release's config.json (diffusers' LTX-2 conversion writes them): SanaVideoPipeline reads
        # its vae_scale_factor_* from these config values, None when absent, and the model's fallback
        # formula (patch 4 x 2 ** four scaling blocks = 64) does not fit LTX-2's spatial-only / temporal-only
        # first two downsamplers
        "spatial_compression_ratio": 32,
        "temporal_compression_ratio": 8,
        **{k: v for k, v in LTX2_RELEASE.items() if k not in ("in_channels", "out_channels")},
    }


@pytest.fixture(scope="module")
def tiny_ltx2_vae():
    """diffusers' AutoencoderKLLTX2Video of the tiny config, random fp32 weights and latent statistics."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLLTX2Video(**tiny_ltx2_vae_config()).eval()
    generator = torch.Generator().manual_seed(1)
    model.latents_mean.copy_(torch.randn(128, generator=generator) * 0.5)
    model.latents_std.copy_(torch.rand(128, generator=generator) + 0.5)
    return model


@pytest.fixture(scope="module")
def ltx2_host(comfy_host):
    """Core's LTX VAE with LTX-2's blocks (SpaceToDepth downsamplers) and a config read from metadata."""
    import inspect

    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx_vae
    import comfy.sd

    if "compress_space_res" not in inspect.getsource(ltx_vae.Encoder.__init__):
        pytest.skip("this ComfyUI host's LTX VAE has no LTX-2 blocks (compress_space_res)")
    if "metadata" not in inspect.signature(comfy.sd.VAE.__init__).parameters:
        pytest.skip("this ComfyUI host's VAE takes no safetensors metadata (the LTX VAE config)")
    return comfy_host

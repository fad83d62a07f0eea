"""Velox's 3D UNet and Resampler against golden tensors from the lvdm reference (fp32, CPU).

Goldens: ``tests/data/videocrafter/``, written by ``scripts/golden/make_videocrafter_golden.py``
from AILab-CVC/VideoCrafter and Doubiiu/DynamiCrafter at tiny configs (``tiny/videocrafter.py``).
Weights come from the same deterministic generator on both sides, so only inputs and outputs
are stored, plus the reference's key shapes (our names must be lvdm's) and a weight checksum.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from velox.models.resampler import Resampler
from velox.models.unet3d import UNet3D
from velox.tiny.videocrafter import TINY_RESAMPLERS, TINY_UNETS, fill_deterministic, weights_checksum

DATA = Path(__file__).resolve().parents[1] / "data" / "videocrafter"
PARITY_RTOL = 1e-5  # relative L2, fp32


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def load_golden(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = DATA / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"golden {path.name} missing: run scripts/golden/make_videocrafter_golden.py")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def check_module_matches(module: torch.nn.Module, meta: dict[str, str]) -> None:
    want = json.loads(meta["shapes"])
    got = {k: list(v.shape) for k, v in module.state_dict().items()}
    assert got == want, f"key/shape mismatch: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
    assert weights_checksum(module) == pytest.approx(float(meta["checksum"]), rel=1e-9)


@pytest.mark.parametrize("variant", sorted(TINY_UNETS))
def test_unet_matches_reference(variant: str) -> None:
    golden, meta = load_golden(f"unet_{variant}")
    model = fill_deterministic(UNet3D(TINY_UNETS[variant]).eval())
    check_module_matches(model, meta)
    with torch.no_grad():
        out = model(golden["x"], golden["t"], golden["context"], fps=golden["fps"])
        assert relative_l2(out, golden["out"]) < PARITY_RTOL
        if "out_default_fps" in golden:
            default = model(golden["x"], golden["t"], golden["context"])
            assert relative_l2(default, golden["out_default_fps"]) < PARITY_RTOL


@pytest.mark.parametrize("kind", sorted(TINY_RESAMPLERS))
def test_resampler_matches_reference(kind: str) -> None:
    golden, meta = load_golden(f"resampler_{kind}")
    model = fill_deterministic(Resampler(TINY_RESAMPLERS[kind]).eval())
    check_module_matches(model, meta)
    with torch.no_grad():
        assert relative_l2(model(golden["image_embeds"]), golden["tokens"]) < PARITY_RTOL


def test_custom_attention_is_used() -> None:
    """The host swaps in ComfyUI's attention through the ``attention`` argument."""
    calls = []

    def counting_attention(q, k, v, heads, mask=None):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(
            *(t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        ).transpose(1, 2).flatten(2)

    model = fill_deterministic(UNet3D(TINY_UNETS["vc2"], attention=counting_attention).eval())
    with torch.no_grad():
        model(torch.randn(1, 4, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32))
    assert calls

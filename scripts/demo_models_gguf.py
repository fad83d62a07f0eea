"""Tiny GGUF demo checkpoints (Sana Q8_0, Wan 2.1 VACE Q4_K_M), named as the real releases are.

Real names: city96's ``Sana_1600M_1024px_BF16-Q8_0.gguf``-style files and QuantStack's
``Wan2.1_14B_VACE-Q4_K_M.gguf``. The weights are the tiny demo models of ``make_demo_models.py``
(same seeds), written the way city96's converter writes image models: only 2-D weights are
quantized, 1-D tensors and the never-quantize layers stay F32, rows that are not whole blocks fall
back to F16 (city96) / F32 (here). Q4_K_M bumps attention V and FFN-down to Q6_K where that type
is available.

``write_gguf_state_dict`` is also what the tests use to make GGUF files of known weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

SANA_GGUF_FILE = "diffusion_models/Sana_1600M_1024px_BF16-Q8_0.gguf"
WAN21_VACE_GGUF_FILE = "diffusion_models/Wan2.1_14B_VACE-Q4_K_M.gguf"
GGML_MAX_DIMS = 4
Q4_K_M_BUMPS = (r"\.v\.", r"\.ffn\.2\.", r"attn_v", r"\.to_v\.")  # -> Q6_K


def type_for(family: str, base: Q) -> Callable[[str, torch.Tensor], Q]:
    """The GGML type a tensor gets in a ``base`` file of ``family`` (city96's rules, simplified)."""
    from velox.loaders.families import FAMILIES

    keep = re.compile("|".join(FAMILIES[family].keep_float))  # the registry's never-quantize patterns
    bump = re.compile("|".join(Q4_K_M_BUMPS))

    def choose(name: str, tensor: torch.Tensor) -> Q:
        if tensor.ndim != 2 or keep.search(name) or tensor.numel() <= 1024:
            return Q.F32
        qtype = Q.Q6_K if base == Q.Q4_K and bump.search(name) and _can_quantize(Q.Q6_K) else base
        if tensor.shape[1] % GGML_QUANT_SIZES[qtype][0] or not _can_quantize(qtype):
            return Q.F32
        return qtype

    return choose


def gguf_architecture(family: str) -> str:
    from velox.loaders.families import FAMILIES

    return FAMILIES[family].gguf_architecture


def _quantizer(qtype: Q):
    """A (rows, cols) fp32 numpy -> (rows, bytes) uint8 quantizer for ``qtype``, or None."""
    try:  # Velox's torch quantizers (K-quants included)
        from velox.kernels.gguf_quantize_torch import QUANTIZE_TYPES, quantize
    except ImportError:
        QUANTIZE_TYPES, quantize = (), None
    if qtype in QUANTIZE_TYPES:
        return lambda rows: quantize(torch.from_numpy(rows), qtype).numpy()
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16):
        import gguf.quants

        return lambda rows: gguf.quants.quantize(rows, qtype)
    return None


def _can_quantize(qtype: Q) -> bool:
    return _quantizer(qtype) is not None


def write_gguf_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                          choose: Callable[[str, torch.Tensor], Q], architecture: str) -> Path:
    """Write ``state_dict`` as GGUF: each tensor in ``choose(name, tensor)``'s type."""
    from velox.loaders.gguf_reader import ORIG_SHAPE_PREFIX
    from velox.loaders.gguf_writer import TensorPlan, write_gguf

    metadata: dict[str, object] = {"general.architecture": architecture, "general.quantization_version": 2}
    arrays, plans = {}, []
    for name, tensor in state_dict.items():
        qtype = choose(name, tensor)
        values = tensor.detach().float().contiguous()
        if values.ndim > GGML_MAX_DIMS:  # Wan's 5-D patch embedding: stored 2-D, shape kept in metadata (city96)
            metadata[ORIG_SHAPE_PREFIX + name] = list(values.shape)
            values = values.reshape(values.shape[0], -1)
        if qtype == Q.F32:
            arrays[name] = values.numpy()
        else:
            arrays[name] = _quantizer(qtype)(values.reshape(-1, values.shape[-1]).numpy())
        plans.append(TensorPlan(name, int(qtype), tuple(values.shape)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(path, metadata, plans, lambda plan: arrays[plan.name])
    return path


def dequantized_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as fp32 (what a safetensors export of the same weights holds)."""
    from velox.host.quant_loading import read_gguf_weights
    from velox.host.quant_tensor import PackedWeight

    return {k: v.dequantize(torch.float32) if isinstance(v, PackedWeight) else v.float().clone()
            for k, v in read_gguf_weights(path).items()}


def write_sana_gguf(models: Path) -> None:
    """The demo Sana (make_demo_models.write_sana's weights) as city96-style Q8_0."""
    from velox.models.sana import SanaConfig
    from velox.tiny.gemma import TINY_GEMMA_HIDDEN
    from velox.tiny.sana import tiny_sana_state_dict

    config = SanaConfig(name="demo_tiny_sana", hidden_size=64, depth=2, num_heads=2,
                        caption_channels=TINY_GEMMA_HIDDEN)
    weights = {k: v for k, v in tiny_sana_state_dict(config, seed=0).items() if k != "pos_embed"}
    # Mix-FFN 1x1 convs as the 2-D matrices they are, so their rows can be Q8_0 blocks
    weights = {k: v.flatten(1) if k.endswith(("inverted_conv.conv.weight", "point_conv.conv.weight")) else v
               for k, v in weights.items()}
    write_gguf_state_dict(models / SANA_GGUF_FILE, weights, type_for("sana", Q.Q8_0), gguf_architecture("sana"))


def write_wan21_vace_gguf(models: Path) -> None:
    """The demo Wan 2.1 VACE (make_demo_models.write_wan21_vace's weights) as Q4_K_M, QuantStack-named."""
    import dataclasses

    from velox.tiny.wan import TINY_UMT5, TINY_WAN_CONFIGS, tiny_wan_state_dict

    config = dataclasses.replace(TINY_WAN_CONFIGS["vace"], text_dim=TINY_UMT5["d_model"])
    base = Q.Q4_K if _can_quantize(Q.Q4_K) else Q.Q4_0
    write_gguf_state_dict(models / WAN21_VACE_GGUF_FILE, tiny_wan_state_dict(config, seed=3),
                          type_for("wan", base), gguf_architecture("wan"))


WRITERS = {"sana gguf": write_sana_gguf, "wan 2.1 vace gguf": write_wan21_vace_gguf}

"""Tiny NVFP4 demo checkpoints (Wan 2.1 T2V, Sana 1600M) in ComfyUI core's ``comfy_quant`` format.

They are the tiny demo models of ``make_demo_models.py`` (its files, written first), cast to bf16
and converted the way a bf16 release is: ``scripts/convert_to_gguf.py --format nvfp4``
(``loaders/nvfp4_convert.py``), so the matrices of the transformer blocks are NVFP4 and the
embeddings, norms, modulation and heads stay in high precision.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

WAN21_T2V_NVFP4_FILE = "diffusion_models/wan2.1_t2v_1.3B_nvfp4.safetensors"
SANA_NVFP4_FILE = "diffusion_models/Sana_1600M_1024px_nvfp4.safetensors"
# NVFP4 demo file -> the bf16 demo file it is converted from (make_demo_models.py's names)
SOURCES = {WAN21_T2V_NVFP4_FILE: "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors",
           SANA_NVFP4_FILE: "diffusion_models/Sana_1600M_1024px_BF16.pth"}


def write_nvfp4_demo(models: Path, target: str) -> None:
    """Convert the demo model ``SOURCES[target]`` (cast to bf16 first) to ``models / target``."""
    from safetensors.torch import save_file

    from velox.loaders.gguf_source import open_checkpoint
    from velox.loaders.nvfp4_convert import convert_to_nvfp4

    source = models / SOURCES[target]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the demo model {target} is converted from; write it first")
    checkpoint = open_checkpoint(source)
    weights = {name: checkpoint.load(name).to(torch.bfloat16).contiguous() for name in checkpoint.meta}
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp) / "bf16.safetensors"
        save_file(weights, str(bf16))
        convert_to_nvfp4(bf16, models / target)


NVFP4_WRITERS = {"wan 2.1 t2v nvfp4": lambda models: write_nvfp4_demo(models, WAN21_T2V_NVFP4_FILE),
                 "sana nvfp4": lambda models: write_nvfp4_demo(models, SANA_NVFP4_FILE)}

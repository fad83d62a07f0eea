"""GGUF dequantization of one 13824x5120 weight (Wan 14B's FFN up-projection) to bf16, every type.

Velox's Triton kernels vs the PyTorch twin (a stand-in for ComfyUI-GGUF's pure-torch dequant, which
works the same way: vectorized shifts and masks, one kernel launch per op) vs a plain bf16 copy of a
weight of the same shape (the memory-bandwidth floor a dequantize-then-GEMM path pays anyway).
The blocks are random bytes with finite fp16 scales (every such block is valid); each type is
checked bit-exact, Triton against the twin, before it is timed.

    python bench/bench_gguf_dequant.py --types Q4_K Q8_0 --dtype bf16 --comfyui-gguf ../ComfyUI-GGUF

``--comfyui-gguf`` points at a checkout of city96/ComfyUI-GGUF (its ``dequant.py`` is imported from
there, never copied into Velox) to time its dequantizer on the same blocks, in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from common import cuda_time, emit, register_pack

SHAPE = (13824, 5120)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_blocks(qtype, shape: tuple[int, int]) -> torch.Tensor:
    """Valid raw bytes of a ``shape`` tensor of ``qtype`` on the GPU: (rows, bytes_per_row) uint8."""
    from velox.kernels.gguf_types import FP16_FIELDS, block_layout

    g = torch.Generator("cuda").manual_seed(int(qtype))
    weights = torch.randn(shape, device="cuda", generator=g) * 0.05
    float_views = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if qtype.name in float_views:
        return weights.to(float_views[qtype.name]).view(torch.uint8)
    block_size, type_size = block_layout(qtype)
    n_blocks = shape[0] * shape[1] // block_size
    blocks = torch.randint(0, 256, (n_blocks, type_size), device="cuda", dtype=torch.uint8, generator=g)
    for offset in FP16_FIELDS[qtype]:
        scales = (torch.rand(n_blocks, 1, device="cuda", generator=g) * 1e-3).half()
        blocks[:, offset:offset + 2] = scales.view(torch.uint8)
    return blocks.view(shape[0], -1)


def comfyui_gguf_dequant(folder: str | None):
    """ComfyUI-GGUF's ``dequantize(data, qtype, oshape, dtype)``, imported from its checkout."""
    if folder is None:
        return None
    spec = importlib.util.spec_from_file_location("comfyui_gguf_dequant", Path(folder) / "dequant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dequantize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", nargs="+", default=None, help="GGML type names (default: all supported)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--comfyui-gguf", default=None, help="a ComfyUI-GGUF checkout, to time its dequant too")
    args = parser.parse_args()
    theirs = comfyui_gguf_dequant(args.comfyui_gguf)
    register_pack()
    from velox.kernels.gguf_dequant_torch import dequantize_torch
    from velox.kernels.gguf_dequant_triton import dequantize_triton
    from velox.kernels.gguf_types import SUPPORTED_TYPES, block_layout

    dtype = DTYPES[args.dtype]
    types = [t for t in SUPPORTED_TYPES if args.types is None or t.name in args.types]
    numel = SHAPE[0] * SHAPE[1]
    source = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16)
    target = torch.empty_like(source)
    copy_s = cuda_time(lambda: target.copy_(source), repeat=args.repeat)
    out_bytes = numel * torch.finfo(dtype).bits // 8
    for qtype in types:
        data = random_blocks(qtype, SHAPE)
        block_size, type_size = block_layout(qtype)
        with torch.inference_mode():
            exact = torch.equal(dequantize_triton(data, qtype, SHAPE, dtype), dequantize_torch(data, qtype, SHAPE, dtype))
            triton_s = cuda_time(lambda: dequantize_triton(data, qtype, SHAPE, dtype), repeat=args.repeat)
            torch_s = cuda_time(lambda: dequantize_torch(data, qtype, SHAPE, dtype), repeat=args.repeat)
        moved = data.numel() + out_bytes  # bytes read + bytes written
        row = {}
        if theirs is not None and qtype.name not in ("F32", "F16", "BF16"):
            try:
                with torch.inference_mode():
                    # in fp32: ComfyUI-GGUF computes in the output dtype, so its bf16 is rounded twice
                    ours = dequantize_triton(data, qtype, SHAPE, torch.float32)
                    row["comfyui_gguf_fp32_bit_exact"] = torch.equal(ours, theirs(data, qtype, SHAPE, torch.float32))
                    theirs_s = cuda_time(lambda: theirs(data, qtype, SHAPE, dtype), repeat=args.repeat)
                row.update(comfyui_gguf_s=round(theirs_s, 6), speedup_vs_comfyui_gguf=round(theirs_s / triton_s, 2))
            except Exception as error:  # ComfyUI-GGUF lacks some types (it falls back to numpy for them)
                row["comfyui_gguf_error"] = f"{type(error).__name__}: {error}"
        emit({**row, "bench": "gguf_dequant", "type": qtype.name, "shape": list(SHAPE), "out_dtype": args.dtype,
              "bits_per_weight": round(8 * type_size / block_size, 4), "bit_exact_triton_vs_twin": exact,
              "triton_s": round(triton_s, 6), "torch_twin_s": round(torch_s, 6), "bf16_copy_s": round(copy_s, 6),
              "twin_over_triton": round(torch_s / triton_s, 2), "triton_over_copy": round(triton_s / copy_s, 2),
              "triton_gb_s": round(moved / triton_s / 1e9, 1), "copy_gb_s": round(4 * numel / copy_s / 1e9, 1),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__})


if __name__ == "__main__":
    main()

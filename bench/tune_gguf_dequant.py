"""Launch-shape sweep of the GGUF Triton dequantizers: blocks per program x warps, one 13824x5120 weight.

Prints one JSON line per (type, tile, warps) with the median time; the shipped launch shape
(``ELEMENTS_PER_PROGRAM`` and Triton's default 4 warps) is the row with ``"shipped": true``.

    python bench/tune_gguf_dequant.py --types Q4_K Q6_K Q8_0
"""

from __future__ import annotations

import argparse
import itertools

import torch
from bench_gguf_dequant import SHAPE, random_blocks
from common import cuda_time, emit, register_pack


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q5_K", "Q8_0", "Q4_0"])
    parser.add_argument("--elements", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--warps", nargs="+", type=int, default=[2, 4, 8, 16])
    args = parser.parse_args()
    register_pack()
    import triton

    from velox.kernels import gguf_dequant_triton as kernels
    from velox.kernels.gguf_dequant_torch import iq4_code_book
    from velox.kernels.gguf_types import SUPPORTED_TYPES, block_layout

    by_name = {t.name: t for t in SUPPORTED_TYPES}
    for name in args.types:
        qtype = by_name[name]
        data = random_blocks(qtype, SHAPE)
        block_size, type_size = block_layout(qtype)
        blocks = data.reshape(-1, type_size)
        n_blocks = blocks.shape[0]
        out = torch.empty(SHAPE, dtype=torch.bfloat16, device="cuda")
        lut = iq4_code_book(data.device)
        want = kernels.dequantize_triton(data, qtype, SHAPE, torch.bfloat16)
        for elements, warps in itertools.product(args.elements, args.warps):
            tile = max(1, elements // block_size)

            def launch():
                kernels.BLOCK_KERNELS[qtype][(triton.cdiv(n_blocks, tile),)](
                    blocks, out.view(torch.int16), lut, n_blocks, TILE=tile, BF16_OUT=True,
                    enable_fp_fusion=False, num_warps=warps)

            launch()
            exact = torch.equal(out, want)
            seconds = cuda_time(launch, repeat=20)
            emit({"bench": "gguf_dequant_tune", "type": name, "elements_per_program": elements, "warps": warps,
                  "ms": round(seconds * 1e3, 4), "bit_exact": exact,
                  "shipped": (elements, warps) == kernels.LAUNCH_SHAPES.get(qtype, (kernels.ELEMENTS_PER_PROGRAM, 4))})


if __name__ == "__main__":
    main()

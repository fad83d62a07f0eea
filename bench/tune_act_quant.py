"""Launch shapes of the per-token activation quantizers (FP8 rows, INT8 rows) at Wan-14B's shapes.

Each program quantizes one row: pass 1 finds the row's amax, pass 2 writes the codes. ``block`` is
how many elements one loop step loads (a block of the whole row makes each pass one step), ``warps``
the program's width. Every shape is checked bit-exact against the shipped one.

    python bench/tune_act_quant.py [--tokens 32760] [--K 5120 13824]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import cuda_time, emit, register_pack


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--K", type=int, nargs="+", default=[5120, 13824])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    register_pack()
    from velox.kernels.fp8_quant_triton import quantize_fp8_rows_triton
    from velox.kernels.int8_gemm_triton import quantize_int8_rows_triton
    from velox.kernels.triton_launch import row_launch_shape

    quantizers = {"fp8": quantize_fp8_rows_triton, "int8": quantize_int8_rows_triton}
    for K in args.K:
        x = torch.randn(args.tokens, K, device="cuda", dtype=torch.bfloat16)
        traffic = x.numel() * 3  # bf16 read once from HBM, one-byte codes written
        for name, quantize in quantizers.items():
            want_q, want_s = quantize(x)
            for block, warps in itertools.product(args.blocks, args.warps):
                if block > 2 * triton_next_pow2(K):
                    continue
                q, s = quantize(x, block, warps)
                exact = torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
                seconds = cuda_time(lambda block=block, warps=warps: quantize(x, block, warps), repeat=20)
                emit({"bench": "act_quant_tune", "kind": name, "tokens": args.tokens, "K": K, "block": block,
                      "warps": warps, "ms": round(seconds * 1e3, 4), "tb_per_s": round(traffic / seconds / 1e12, 2),
                      "bit_exact": exact, "shipped": (block, warps) == row_launch_shape(K)})


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if __name__ == "__main__":
    main()

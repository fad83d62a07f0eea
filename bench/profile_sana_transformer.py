"""Where the GPU time goes: top CUDA kernels of one compiled forward, Velox vs diffusers (1024², batch 2).

    python bench/profile_sana_transformer.py --res 1024 --mode compile
"""

from __future__ import annotations

import argparse

import torch
from bench_sana_transformer import build_models, compiled, inputs, runners
from common import register_pack
from torch.profiler import ProfilerActivity, profile


def top_kernels(fn, rows: int) -> str:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--mode", default="compile")
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    register_pack()
    reference, ours = build_models(torch.bfloat16)
    x, context, mask, t = inputs(args.res, torch.bfloat16)
    run_ref, run_ours = runners(compiled(reference, args.mode), compiled(ours, args.mode), x, context, mask, t)
    with torch.inference_mode():
        for name, fn in (("velox", run_ours), ("diffusers", run_ref)):
            print(f"===== {name} {args.mode} {args.res}² (5 forwards) =====")
            print(top_kernels(fn, args.rows), flush=True)


if __name__ == "__main__":
    main()

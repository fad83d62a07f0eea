"""Self-attention at Wan-14B's shape (1 x 40 heads x 32 760 tokens x 128, bf16): time, TFLOP/s and
relative L2 vs an fp32 reference, for

- ``cudnn`` / ``flash``: PyTorch SDPA pinned to one backend (cuDNN is what plain SDPA picks on an H100);
- ``8bit_fast`` / ``8bit_accurate``: ``velox.kernels.attention_8bit`` (issue #16);
- ``fa3``: FlashAttention-3 bf16 (the ``fa3-fwd`` wheel), the loaders' ``fa3`` choice, when it can run;
- ``sageattention``: sageattention 1.0.6 (PyPI, Triton; INT8 Q.Kᵀ, fp16 P.V), when importable.

Inputs are Gaussian with a per-head offset in K (what K smoothing is for). The fp32 reference is
computed a few heads at a time to fit in memory. Targets (issue #16): fast >= 1.8x cuDNN at relative
L2 <= 4e-2, accurate >= 1.3x cuDNN at <= 1.5e-2.

``--sweep`` also times each (BLOCK_M, BLOCK_N, num_warps, num_stages) of the 8-bit kernels;
``--check-sm80`` compiles the accurate kernel for sm_80 (Ampere) and lists its MMA instructions.

    python bench/bench_attention.py [--tokens 32760] [--heads 40] [--repeat 10] [--sweep] [--check-sm80]
"""

from __future__ import annotations

import argparse
import itertools
import re

import torch
import torch.nn.functional as F
from common import boot_comfy, cuda_time, emit, register_pack, relative_l2

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
SWEEP_CONFIGS = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3),
                 (128, 128, 8, 4), (64, 128, 4, 3), (64, 64, 4, 4))


def make_inputs(batch: int, heads: int, tokens: int, head_dim: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(3))
    k += torch.randn((1, heads, 1, head_dim), device="cuda", generator=generator, dtype=torch.bfloat16)
    return q, k, v


def fp32_reference(q, k, v, heads_per_chunk: int = 4) -> torch.Tensor:
    """(B, H, L, D) fp32 SDPA, ``heads_per_chunk`` heads at a time."""
    chunks = [F.scaled_dot_product_attention(q[:, h:h + heads_per_chunk].float(), k[:, h:h + heads_per_chunk].float(),
                                             v[:, h:h + heads_per_chunk].float())
              for h in range(0, q.shape[1], heads_per_chunk)]
    return torch.cat(chunks, dim=1)


def sdpa_on(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def methods() -> dict:
    from torch.nn.attention import SDPBackend

    from velox.host.attention_select import fa3_attention, fa3_available
    from velox.kernels.attention_8bit import attention

    found = {"cudnn": sdpa_on(SDPBackend.CUDNN_ATTENTION), "flash": sdpa_on(SDPBackend.FLASH_ATTENTION),
             "8bit_fast": lambda q, k, v: attention(q, k, v),
             "8bit_accurate": lambda q, k, v: attention(q, k, v, accurate=True)}
    if not fa3_available():
        found["fa3"] = fa3_attention
    else:
        print(f"bench: fa3 not available ({fa3_available()})", flush=True)
    try:
        from sageattention import sageattn

        found["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except ImportError as error:
        print(f"bench: sageattention not importable ({error})", flush=True)
    return found


def measure(name: str, run, inputs, reference, repeat: int, baseline: float | None, extra: dict | None = None):
    q, k, v = inputs
    try:
        out = run(q, k, v)
        seconds = cuda_time(lambda: run(q, k, v), repeat=repeat)
    except Exception as error:  # one backend missing on this card must not stop the others
        print(f"bench: {name} failed: {type(error).__name__}: {error}", flush=True)
        return None
    flops = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    record = {"bench": "attention", "method": name, "ms": round(seconds * 1e3, 3),
              "tflops": round(flops / seconds / 1e12, 1), "rel_l2": float(f"{relative_l2(out, reference):.3e}"),
              "speedup_vs_cudnn": round(baseline / seconds, 3) if baseline else None, **(extra or {})}
    print(f"{name:>28}: {record['ms']:8.2f} ms {record['tflops']:7.1f} TFLOP/s  rel L2 {record['rel_l2']:.2e}  "
          f"x{record['speedup_vs_cudnn']}", flush=True)
    emit(record)
    return seconds


def sweep(inputs, reference, repeat: int, baseline: float | None) -> None:
    """Every launch config of both modes, then each kernel option switched off at the shipped config."""
    from velox.kernels.attention_8bit import CONFIGS, KERNEL_OPTIONS, attention_triton

    runs = [(accurate, config, {}) for accurate, config in itertools.product((False, True), SWEEP_CONFIGS)]
    runs += [(accurate, CONFIGS["accurate" if accurate else "fast"], {option: not value})
             for accurate in (False, True) for option, value in KERNEL_OPTIONS.items()
             if not (accurate and option == "PV_PROMOTE")]  # P.V is not FP8 there
    for accurate, config, options in runs:
        name = f"{'accurate' if accurate else 'fast'}{config}{options or ''}"
        measure(name, lambda q, k, v: attention_triton(q, k, v, accurate, config, **options), inputs, reference,
                repeat, baseline, {"config": config, "accurate": accurate, "options": options})
        torch.cuda.empty_cache()


def check_sm80(head_dim: int = 128) -> None:
    """Compile the accurate kernel for sm_80 (no GPU of that kind needed) and list its MMA instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from velox.kernels.attention_8bit import CONFIGS, KERNEL_OPTIONS, attention_kernel

    block_m, block_n, warps, stages = CONFIGS["accurate"]
    constants = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, FP8_PV=False, P_LOG2=0.0, DROP_BITS=16,
                     INTERPRETER=False, **KERNEL_OPTIONS)
    pointers = dict(q_ptr="*i8", k_ptr="*i8", v_ptr="*bf16", out_ptr="*bf16")
    names = attention_kernel.arg_names
    signature = {n: "constexpr" if n in constants else pointers.get(n, "*fp32" if n.endswith("_ptr") else "i32")
                 for n in names}
    source = ASTSource(fn=attention_kernel, signature=signature,
                       constexprs={(names.index(n),): value for n, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    instructions = sorted(set(re.findall(r"mma\.sync\.aligned\.[\w.]+", ptx)))
    emit({"bench": "attention_sm80_compile", "target": str(compiled.metadata.target), "mma": instructions,
          "fp8_instructions": "e4m3" in ptx, "cubin_bytes": len(compiled.asm["cubin"])})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--methods", nargs="*", help="subset of the methods to time (default: all)")
    parser.add_argument("--sweep", action="store_true", help="also time every launch config of the 8-bit kernels")
    parser.add_argument("--check-sm80", action="store_true", help="compile the accurate kernel for sm_80")
    args = parser.parse_args()
    boot_comfy()  # the loaders' attention choices import comfy_api
    register_pack()
    print(f"bench: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.check_sm80:
        check_sm80(args.head_dim)
    inputs = make_inputs(args.batch, args.heads, args.tokens, args.head_dim)
    reference = fp32_reference(*inputs)
    baseline = None
    for name, run in methods().items():
        if args.methods and name not in args.methods:
            continue
        seconds = measure(name, run, inputs, reference, args.repeat, baseline)
        baseline = seconds if name == "cudnn" and seconds else baseline
        torch.cuda.empty_cache()
    if args.sweep:
        sweep(inputs, reference, args.repeat, baseline)


if __name__ == "__main__":
    main()

"""Host overhead of one quantized Linear call in a launch-bound forward (Sana-1.6B at 1024²: 2048
tokens, width 2240), split into its parts: where the Q8_0 forward's extra time goes.

For each path it reports the host time per call (the Python and launch work, measured while the GPU is
held busy by a sleep kernel so the host never waits) and the GPU time per call (CUDA events that start
once the sleep ends, so the GPU never waits on the host). A forward is launch-bound when host > GPU.
``--profile`` adds the top functions of a cProfile of the Q8_0 layer call.

    python bench/bench_quant_overhead.py [--tokens 2048] [--features 2240 2240] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from unittest import mock

import torch
import torch.nn.functional as F
from common import boot_comfy, emit, register_pack

SLEEP_CYCLES = 200_000_000  # ~0.1 s on an H100: longer than enqueuing ``calls`` calls of any path


def host_and_gpu_seconds(fn, calls: int = 100) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / 1e3 / calls


def quant_layer(weight: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.nn.Module:
    from gguf import GGMLQuantizationType as Q

    from velox.host.quant_ops import make_quant_operations
    from velox.host.quant_tensor import quantize_weight_gguf

    out_features, in_features = weight.shape
    ops = make_quant_operations("none", "dequant", ())
    layer = ops.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    stored = weight if kind == "dense" else quantize_weight_gguf(weight, Q.Q8_0)
    layer.load_state_dict({"weight": stored, "bias": bias}, strict=False)
    return layer.eval()


def noop_launch():
    """A Triton kernel that does nothing: the launcher's own host cost."""
    import triton
    import triton.language as tl

    @triton.jit
    def _noop(ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ptr + offsets, tl.load(ptr + offsets, mask=offsets < n), mask=offsets < n)

    buffer = torch.zeros(128, device="cuda")
    return lambda: _noop[(1,)](buffer, 128, BLOCK=128)


def paths(tokens: int, out_features: int, in_features: int) -> dict:
    from gguf import GGMLQuantizationType as Q

    from velox.kernels import gguf_dequant
    from velox.kernels.gguf_dequant_torch import dequantize_torch
    from velox.kernels.gguf_dequant_triton import dequantize_through_triton, dequantize_triton
    from velox.kernels.gguf_quantize_torch import quantize

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, tokens, in_features, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(out_features, in_features, device="cuda", generator=g) / in_features**0.5).bfloat16()
    bias = torch.zeros(out_features, device="cuda", dtype=torch.bfloat16)
    blocks = quantize(weight.float(), Q.Q8_0)
    dense, q8 = quant_layer(weight, bias, "dense"), quant_layer(weight, bias, "q8_0")
    shape = (out_features, in_features)

    def q8_with_torch_dequant():
        with mock.patch.object(gguf_dequant, "uses_triton", lambda device: False):
            return q8(x)

    packed, plain = q8.weight, q8.weight.data
    return {
        "quant_ops Linear, Q8_0, _packed_forward only": lambda: q8._packed_forward(x),
        "dequantize_triton(Parameter) + F.linear": lambda: F.linear(
            x, dequantize_triton(packed, 8, shape, torch.bfloat16), bias),
        "dequantize_triton(plain tensor) + F.linear": lambda: F.linear(
            x, dequantize_triton(plain, 8, shape, torch.bfloat16), bias),
        "F.linear bf16": lambda: F.linear(x, weight, bias),
        "quant_ops Linear, dense weight": lambda: dense(x),
        "quant_ops Linear, Q8_0": lambda: q8(x),
        "quant_ops Linear, Q8_0, PyTorch dequant": q8_with_torch_dequant,
        "dequantize_triton Q8_0 alone (direct launch)": lambda: dequantize_triton(blocks, int(Q.Q8_0), shape, torch.bfloat16),
        "dequantize Q8_0 through Triton's launcher": lambda: dequantize_through_triton(
            blocks, int(Q.Q8_0), shape, torch.bfloat16, None),
        "dequantize_torch Q8_0 alone": lambda: dequantize_torch(blocks, int(Q.Q8_0), shape, torch.bfloat16),
        "Triton no-op launch": noop_launch(),
        "torch.empty_like": lambda: torch.empty_like(weight),
    }, q8, x


def glue_us(layer, x) -> dict[str, float]:
    """Host microseconds of the pieces of ``_packed_forward`` that launch nothing."""
    import timeit

    from velox.host.quant_tensor import kind_of

    weight, bias = layer.weight, layer.bias
    pieces = {
        "layer.weight (Module.__getattr__)": lambda: layer.weight,
        "weight.to(same device, non_blocking)": lambda: weight.to(x.device, non_blocking=True),
        "bias.to(device=, dtype=, non_blocking)": lambda: bias.to(device=x.device, dtype=x.dtype, non_blocking=True),
        "weight.device == x.device": lambda: weight.device == x.device,
        "layer.weight_kind": lambda: layer.weight_kind,
        "kind_of(dtype)": lambda: kind_of(weight.dtype),
        "layer._fused(x)": lambda: layer._fused(x),
        "comfy.ops.run_every_op()": __import__("comfy.ops").ops.run_every_op,
        "weight.data_ptr() % 16": lambda: weight.data_ptr() % 16 == 0,
        "weight.is_contiguous()": lambda: weight.is_contiguous(),
    }
    return {name: round(timeit.timeit(fn, number=20000) / 20000 * 1e6, 2) for name, fn in pieces.items()}


def profile(layer, x, calls: int = 300) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        layer(x)
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, nargs=2, default=[2240, 2240], metavar=("OUT", "IN"))
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    boot_comfy()
    register_pack()
    table, q8, x = paths(args.tokens, *args.features)
    with torch.inference_mode():
        for name, fn in table.items():
            host, gpu = host_and_gpu_seconds(fn, args.calls)
            emit({"bench": "quant_overhead", "path": name, "tokens": args.tokens, "out": args.features[0],
                  "in": args.features[1], "host_us": round(host * 1e6, 1), "gpu_us": round(gpu * 1e6, 1),
                  "device": torch.cuda.get_device_name()})
        emit({"bench": "quant_overhead_glue", **glue_us(q8, x)})
        if args.profile:
            print(profile(q8, x), flush=True)


if __name__ == "__main__":
    main()

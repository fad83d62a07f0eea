"""Wan 2.1 14B transformer forward at 480x832, 81 frames (32 760 tokens, batch 1, 512 text tokens) with
quantized Linears vs our bf16 and ComfyUI's native bf16, plus the weight memory each keeps on the GPU.

Variants (``--variants``):
- ``native_bf16``: core's WanModel on ``comfy.ops.disable_weight_init`` (the 2.93 s anchor);
- ``ours_bf16``: the same model on Velox's ``quant_ops`` with dense weights (the cost of our Linear);
- ``q8_0`` / ``q4_k``: GGUF blocks kept packed, dequantized per call (Triton), city96's never-quantize
  list (Q4_K: every quantized weight in Q4_K, a lower bound for Q4_K_M);
- ``fp8_dequant`` / ``fp8_lowp`` / ``int8_lowp``: fp8 / int8 per-channel weights, dequantize + bf16
  GEMM, or W8A8 with per-token activation scales (FP8 ``_scaled_mm``, INT8 Velox's Triton kernel);
- ``nvfp4``: core's NVFP4 layout kept packed, Velox's dequant-GEMM (issue #23);
- ``<weights>_attn_<choice>``: the same weights with the loaders' ``attention`` choice (``fa3``, ``8bit``,
  ``8bit-accurate``) installed as ComfyUI's ``optimized_attention_override`` (issue #16).

Weights are random at the real shapes (one bf16 state dict made on the GPU), quantized on the GPU.
Each forward's output is compared with ``native_bf16``'s (relative L2). Targets (issue #4): Q4_K and
Q8_0 <= 1.05x our bf16; Q4_K weights <= 10 GB; fp8_lowp <= 0.87x native (2.93 s).

    python bench/bench_wan_quant.py [--variants native_bf16 q4_k fp8_lowp] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import boot_comfy, cuda_time, emit, register_pack, relative_l2

WAN_14B = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824,
               freq_dim=256, text_dim=4096, out_dim=16, num_heads=40, num_layers=40)
LATENT = (1, 16, 21, 60, 104)  # 81 frames -> 21 latent frames, 480x832 / 8; patches of 1x2x2 -> 32 760 tokens
VARIANTS = ("native_bf16", "ours_bf16", "q8_0", "q4_k", "q4_k_lora4", "fp8_dequant", "fp8_lowp", "fp8_lowp_exact_accum",
            "int8_lowp", "nvfp4", "native_bf16_attn_fa3", "native_bf16_attn_8bit", "native_bf16_attn_8bit-accurate",
            "fp8_lowp_attn_8bit", "fp8_lowp_attn_8bit-accurate")
LORAS, LORA_RANK = 4, 128  # q4_k_lora4: issue #6's stack, unmerged side products on every quantized Linear
QUANTIZE_AT_LOAD = {"fp8_dequant": ("fp8_e4m3", "dequant"), "fp8_lowp": ("fp8_e4m3", "lowp"),
                    "fp8_lowp_exact_accum": ("fp8_e4m3", "lowp"), "int8_lowp": ("int8", "lowp"),
                    "nvfp4": ("nvfp4", "dequant")}


def split_variant(variant: str) -> tuple[str, str | None]:
    """``fp8_lowp_attn_8bit`` -> (``fp8_lowp``, ``8bit``): the weights' variant and the attention choice."""
    weights, _, attention = variant.partition("_attn_")
    return weights, attention or None


def random_state_dict(config: dict = WAN_14B) -> dict[str, torch.Tensor]:
    """bf16 weights of the Wan ``config``'s shapes (default 14B) with sane scales (1/sqrt(fan_in), norms at 1)."""
    import comfy.ldm.wan.model
    import comfy.ops

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.ldm.wan.model.WanModel(
            **config, operations=comfy.ops.disable_weight_init).state_dict().items()}
    g = torch.Generator("cuda").manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight") or ".norm" in key and key.endswith(".weight"):
            state[key] = torch.ones(shape, device="cuda", dtype=torch.bfloat16)
            continue
        value = torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
        fan_in = max(1, value[0].numel()) if value.ndim > 1 else shape[-1]
        state[key] = value / fan_in**0.5 if not key.endswith("bias") else value * 0.01
    return state


def build(variant: str, state: dict[str, torch.Tensor]):
    variant, _ = split_variant(variant)
    import comfy.ldm.wan.model
    import comfy.ops
    from gguf import GGMLQuantizationType as Q

    from velox.host.quant_loading import NEVER_QUANTIZE
    from velox.host.quant_ops import make_quant_operations
    from velox.host.quant_tensor import quantize_weight_gguf
    from velox.host.shared_activation import SHARED_INPUT

    if variant == "native_bf16":
        ops, weights = comfy.ops.disable_weight_init, state
    else:
        quantization, compute = QUANTIZE_AT_LOAD.get(variant, ("none", "dequant"))
        ops = make_quant_operations(quantization, compute, NEVER_QUANTIZE["wan"], shared_input=SHARED_INPUT["wan"])
        weights = dict(state)
        if variant in ("q8_0", "q4_k", "q4_k_lora4"):
            import re

            keep = re.compile("|".join(NEVER_QUANTIZE["wan"]))
            qtype = Q.Q8_0 if variant == "q8_0" else Q.Q4_K
            for key, value in state.items():
                if key.endswith(".weight") and value.ndim == 2 and not keep.search(key[: -len(".weight")]):
                    weights[key] = quantize_weight_gguf(value, qtype)
    model = comfy.ldm.wan.model.WanModel(**WAN_14B, device="cuda", dtype=torch.bfloat16, operations=ops).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing[:4], unexpected[:4])
    if variant.endswith("_lora4"):
        attach_lora_stack(model)
    return model


def attach_lora_stack(model: torch.nn.Module) -> int:
    """4 random rank-128 LoRAs on every packed Linear, as ``VeloxLoraStack`` attaches them to a quantized
    model (a ``LowRankSide`` in ``velox_lowrank``); returns how many layers got one."""
    from velox.host.lowrank import LowRankSide

    g = torch.Generator("cuda").manual_seed(2)
    layers = 0
    for module in model.modules():
        if getattr(module, "weight_kind", "dense") == "dense" or not hasattr(module, "velox_lowrank"):
            continue
        terms = [(torch.randn(LORA_RANK, module.in_features, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01,
                  torch.randn(module.out_features, LORA_RANK, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01,
                  0.5) for _ in range(LORAS)]
        module.velox_lowrank = LowRankSide(terms)
        layers += 1
    return layers


def weight_gb(model: torch.nn.Module) -> float:
    return sum(t.nelement() * t.element_size() for t in model.state_dict().values()) / 1e9


def print_profile(variant: str, run, rows: int = 20) -> None:
    """Top CUDA kernels of one forward, with their share of its GPU time (issue #16's profile)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"profile {variant}: {total / 1e3:.1f} ms of kernels", flush=True)
    for event in sorted(events, key=lambda e: -e.device_time_total)[:rows]:
        print(f"  {event.device_time_total / total:6.1%} {event.device_time_total / 1e3:9.1f} ms "
              f"x{event.count:<5} {event.key[:110]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", nargs="*", default=[], help="variants whose forward is profiled (top kernels)")
    args = parser.parse_args()
    boot_comfy()
    register_pack()
    state = random_state_dict()
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(LATENT, device="cuda", dtype=torch.bfloat16, generator=g)
    context = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.tensor([750.0], device="cuda")
    from velox.kernels import fp8_linear

    shipped_fast_accum = fp8_linear.FAST_ACCUM
    reference, seconds = None, {}
    for variant in args.variants:
        model = build(variant, state)
        # fp8_lowp runs as shipped (fast accumulation); fp8_lowp_exact_accum promotes partial sums
        fp8_linear.FAST_ACCUM = shipped_fast_accum and not variant.endswith("_exact_accum")
        options = {}
        if attention := split_variant(variant)[1]:
            from velox.host.attention_select import OVERRIDES

            options["optimized_attention_override"] = OVERRIDES[attention]
        with torch.inference_mode():
            run = lambda model=model: model(x, t, context, transformer_options=options)  # noqa: E731
            out = run().float()
            seconds[variant] = cuda_time(run, warmup=1, repeat=args.repeat)
            if variant in args.profile:
                print_profile(variant, run)
        if reference is None:
            reference = out
        record = {"bench": "wan14b_quant_forward", "variant": variant, "s": round(seconds[variant], 4),
                  "weight_gb": round(weight_gb(model), 2), "rel_err_vs_first": round(relative_l2(out, reference), 5),
                  "first": args.variants[0], "tokens": 32760, "device": torch.cuda.get_device_name()}
        for anchor in ("native_bf16", "ours_bf16", "q4_k"):
            if anchor in seconds:
                record[f"ratio_vs_{anchor}"] = round(seconds[variant] / seconds[anchor], 3)
        emit(record)
        del model, out
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

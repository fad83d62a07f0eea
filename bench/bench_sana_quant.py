"""Sana-1.6B transformer forward at 1024² (batch 2 = one CFG step, 300 text tokens) from GGUF Q8_0 /
Q4_K and from fp8 / int8 weights vs our bf16, with the GPU weight memory of each.

Variants (``--variants``): ``bf16`` (plain ``nn.Linear``), ``ours_bf16`` (``quant_ops`` Linear, dense
weights), ``q8_0`` / ``q4_k`` (GGUF blocks dequantized per call by Triton; Sana's never-quantize list;
Q4_K only where rows are whole 256-blocks, the rest Q8_0), ``fp8_dequant``, ``fp8_lowp``, ``int8_lowp``.
At 1024 tokens per image a layer's GEMM is short, so the per-call dequantization shows here more than
in Wan. Target (issue #4): Q8_0 <= 1.15x bf16.

    python bench/bench_sana_quant.py [--variants bf16 q8_0] [--res 1024 2048] [--repeat 20]
"""

from __future__ import annotations

import argparse
import gc
import re

import torch
from common import boot_comfy, cuda_time, emit, register_pack, relative_l2

VARIANTS = ("bf16", "ours_bf16", "q8_0", "q4_k", "fp8_dequant", "fp8_lowp", "int8_lowp")
QUANTIZE_AT_LOAD = {"fp8_dequant": ("fp8_e4m3", "dequant"), "fp8_lowp": ("fp8_e4m3", "lowp"),
                    "int8_lowp": ("int8", "lowp")}


def reference_model():
    from velox.models.sana import SANA_PRESETS, SanaTransformer

    torch.manual_seed(0)
    model = SanaTransformer(**SANA_PRESETS["sana_1600m"].model_kwargs(), device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():  # every parameter random at a sane scale (some are left uninitialized by the module)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
            else:
                param.normal_(0.0, 0.02)
    return model


def build(variant: str, reference: torch.nn.Module) -> torch.nn.Module:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    from velox.host.quant_loading import NEVER_QUANTIZE
    from velox.host.quant_ops import make_quant_operations
    from velox.host.quant_tensor import quantize_weight_gguf
    from velox.models.sana import SANA_PRESETS, SanaTransformer

    if variant == "bf16":
        return reference
    quantization, compute = QUANTIZE_AT_LOAD.get(variant, ("none", "dequant"))
    ops = make_quant_operations(quantization, compute, NEVER_QUANTIZE["sana"])
    weights = dict(reference.state_dict())
    if variant in ("q8_0", "q4_k"):
        keep = re.compile("|".join(NEVER_QUANTIZE["sana"]))
        for key, value in reference.state_dict().items():
            if not key.endswith(".weight") or value.ndim != 2 or keep.search(key[: -len(".weight")]):
                continue
            qtype = Q.Q4_K if variant == "q4_k" and value.shape[1] % GGML_QUANT_SIZES[Q.Q4_K][0] == 0 else Q.Q8_0
            weights[key] = quantize_weight_gguf(value, qtype)
    model = SanaTransformer(**SANA_PRESETS["sana_1600m"].model_kwargs(), device="cuda", dtype=torch.bfloat16,
                            operations=ops).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing[:4], unexpected[:4])
    return model


def inputs(resolution: int, batch: int = 2):
    side = resolution // 32
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(batch, 32, side, side, device="cuda", dtype=torch.bfloat16, generator=g)
    context = torch.randn(batch, 300, 2304, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = torch.ones(batch, 300, device="cuda", dtype=torch.int64)
    mask[0, 40:] = 0
    return x, context, mask, torch.full((batch,), 750.0, device="cuda")


def weight_gb(model: torch.nn.Module) -> float:
    return sum(t.nelement() * t.element_size() for t in model.state_dict().values()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--res", type=int, nargs="+", default=[1024])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each variant's model (what core's TorchCompileModel node does)")
    args = parser.parse_args()
    boot_comfy()
    register_pack()
    reference = reference_model()
    for resolution in args.res:
        x, context, mask, t = inputs(resolution)
        baseline, seconds = None, {}
        for variant in args.variants:
            model = build(variant, reference)
            forward = torch.compile(model) if args.compile else model
            with torch.inference_mode():
                run = lambda forward=forward: forward(x, t, context, context_mask=mask)  # noqa: E731
                out = run().float()
                seconds[variant] = cuda_time(run, warmup=3, repeat=args.repeat)
            baseline = out if baseline is None else baseline
            record = {"bench": "sana1600m_quant_forward", "resolution": resolution, "variant": variant,
                      "compiled": args.compile,
                      "s": round(seconds[variant], 5), "weight_gb": round(weight_gb(model), 3),
                      "rel_err_vs_first": round(relative_l2(out, baseline), 5), "first": args.variants[0],
                      "device": torch.cuda.get_device_name()}
            for anchor in ("bf16", "ours_bf16"):
                if anchor in seconds:
                    record[f"ratio_vs_{anchor}"] = round(seconds[variant] / seconds[anchor], 3)
            emit(record)
            if model is not reference:
                del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

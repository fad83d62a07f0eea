"""Sana-1.6B transformer forward, batch 2 (one CFG step), 300 text tokens: Velox vs diffusers 0.42.1.

Both models hold the same random bf16 weights (diffusers' init, mapped onto ours by the loader's
key map). Modes: ``eager``; ``compile`` (torch.compile, default mode, what the loader's
``compile`` option does); ``reduce-overhead`` (CUDA graphs).

    python bench/bench_sana_transformer.py --res 1024 4096 --modes eager compile [--ours fp8_lowp]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cuda_time, emit, peak_gib, register_pack, relative_l2

SANA_1600M_DIFFUSERS = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False,
    norm_eps=1e-6, interpolation_scale=None,
)


QUANTIZATIONS = {"bf16": ("none", "dequant"), "fp8_lowp": ("fp8_e4m3", "lowp"), "int8_lowp": ("int8", "lowp")}


def build_models(dtype: torch.dtype, quantization: str = "bf16"):
    """diffusers' model and ours on the same weights; ``quantization`` other than bf16 builds ours on
    Velox's quantized Linears (weights quantized at load, as the loader's ``quantization`` input does)."""
    from diffusers import SanaTransformer2DModel

    from velox.loaders.sana_keys import canonicalize_sana_state_dict
    from velox.models.sana import SANA_PRESETS, SanaTransformer

    torch.manual_seed(0)
    reference = SanaTransformer2DModel(**SANA_1600M_DIFFUSERS).to("cuda", dtype).eval()
    operations = {}
    if quantization != "bf16":
        from velox.host.quant_loading import NEVER_QUANTIZE
        from velox.host.quant_ops import make_quant_operations

        operations["operations"] = make_quant_operations(*QUANTIZATIONS[quantization], NEVER_QUANTIZE["sana"])
    ours = SanaTransformer(**SANA_PRESETS["sana_1600m"].model_kwargs(), device="cuda", dtype=dtype,
                           **operations).eval()
    missing, unexpected = ours.load_state_dict(canonicalize_sana_state_dict(reference.state_dict()), strict=False)
    assert not missing and not unexpected, (missing[:4], unexpected[:4])
    return reference, ours


def inputs(resolution: int, dtype: torch.dtype, batch: int = 2):
    side = resolution // 32
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(batch, 32, side, side, device="cuda", dtype=dtype, generator=g)
    context = torch.randn(batch, 300, 2304, device="cuda", dtype=dtype, generator=g)
    mask = torch.ones(batch, 300, device="cuda", dtype=torch.int64)
    mask[0, 40:] = 0  # a short positive prompt, a full-length negative
    t = torch.full((batch,), 750.0, device="cuda")
    return x, context, mask, t


def runners(reference, ours, x, context, mask, t):
    def run_reference():
        return reference(hidden_states=x, encoder_hidden_states=context, encoder_attention_mask=mask,
                         timestep=t, return_dict=False)[0]

    def run_ours():
        return ours(x, t, context, context_mask=mask)

    return run_reference, run_ours


def compiled(model, mode: str):
    if mode == "eager":
        return model
    return torch.compile(model, mode=None if mode == "compile" else mode, dynamic=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--res", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--modes", nargs="+", default=["eager"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--ours", choices=list(QUANTIZATIONS), default="bf16",
                        help="our weights: bf16, or quantized at load (FP8 / INT8 W8A8, issue #18)")
    args = parser.parse_args()
    if args.ours != "bf16":
        from common import boot_comfy

        boot_comfy()  # the quantized Linears come from the host bridge
    register_pack()
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    reference, ours = build_models(dtype, args.ours)
    for mode in args.modes:
        ref_model, our_model = compiled(reference, mode), compiled(ours, mode)
        for resolution in args.res:
            x, context, mask, t = inputs(resolution, dtype)
            run_ref, run_ours = runners(ref_model, our_model, x, context, mask, t)
            with torch.inference_mode():
                start = time.perf_counter()
                error = relative_l2(run_ours().clone(), run_ref().clone())  # CUDA graphs reuse outputs
                first_call_s = time.perf_counter() - start
                ref_s = cuda_time(run_ref, repeat=args.repeat)
                ours_s = cuda_time(run_ours, repeat=args.repeat)
                ref_gib, ours_gib = peak_gib(run_ref), peak_gib(run_ours)
            emit({"bench": "sana_1600m_forward_b2", "mode": mode, "resolution": resolution, "ours": args.ours,
                  "diffusers_s": round(ref_s, 5), "velox_s": round(ours_s, 5), "ratio": round(ours_s / ref_s, 3),
                  "diffusers_peak_gib": round(ref_gib, 2), "velox_peak_gib": round(ours_gib, 2),
                  "bf16_rel_l2_vs_diffusers": round(error, 5), "first_call_s": round(first_call_s, 1),
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__})


if __name__ == "__main__":
    main()

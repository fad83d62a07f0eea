"""SANA-Video 2B transformer forward at 480x832, 81 frames (21 x 30 x 52 = 32 760 tokens), batch 2 (one
CFG step), 300 text tokens: Velox vs diffusers 0.42.1 ``SanaVideoTransformer3DModel``.

Both models hold the same random bf16 weights (diffusers' init, mapped onto ours by the loader's key
map). Modes: ``eager``; ``compile`` (torch.compile, default mode). Targets (issue #17): eager <= 0.7x
diffusers eager, compiled <= 0.9x diffusers compiled, in the same run.

    python bench/bench_sana_video_transformer.py --modes eager compile [--frames 81] [--batch 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cuda_time, emit, peak_gib, register_pack, relative_l2


def build_models(dtype: torch.dtype):
    from diffusers import SanaVideoTransformer3DModel

    from velox.loaders.sana_video_keys import canonicalize_sana_video_state_dict, diffusers_config
    from velox.models.sana_video import SANA_VIDEO_PRESETS, SanaVideoTransformer

    config = SANA_VIDEO_PRESETS["sana_video_2b_480p"]
    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    torch.manual_seed(0)
    reference = SanaVideoTransformer3DModel(**kwargs).to("cuda", dtype).eval()
    ours = SanaVideoTransformer(**config.model_kwargs(), device="cuda", dtype=dtype).eval()
    ours.load_state_dict(canonicalize_sana_video_state_dict(reference.state_dict()), strict=True)
    return reference, ours


def inputs(frames: int, height: int, width: int, dtype: torch.dtype, batch: int):
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(batch, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="cuda", dtype=dtype,
                    generator=g)
    context = torch.randn(batch, 300, 2304, device="cuda", dtype=dtype, generator=g)
    mask = torch.ones(batch, 300, device="cuda", dtype=torch.int64)
    mask[0, 40:] = 0  # a short negative prompt, a full-length positive (instruction-prefixed)
    t = torch.full((batch,), 750.0, device="cuda")
    return x, context, mask, t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    register_pack()
    dtype = torch.bfloat16
    reference, ours = build_models(dtype)
    x, context, mask, t = inputs(args.frames, args.height, args.width, dtype, args.batch)
    for mode in args.modes:
        ref_model = reference if mode == "eager" else torch.compile(reference, dynamic=False)
        our_model = ours if mode == "eager" else torch.compile(ours, dynamic=False)

        def run_ref():
            return ref_model(hidden_states=x, encoder_hidden_states=context, encoder_attention_mask=mask,
                             timestep=t, return_dict=False)[0]

        def run_ours():
            return our_model(x, t, context, context_mask=mask)

        with torch.inference_mode():
            start = time.perf_counter()
            error = relative_l2(run_ours().clone(), run_ref().clone())
            first_call_s = time.perf_counter() - start
            ref_s = cuda_time(run_ref, warmup=2, repeat=args.repeat)
            ours_s = cuda_time(run_ours, warmup=2, repeat=args.repeat)
            ref_gib, ours_gib = peak_gib(run_ref), peak_gib(run_ours)
        emit({"bench": "sana_video_2b_forward", "mode": mode, "frames": args.frames, "batch": args.batch,
              "size": f"{args.height}x{args.width}", "diffusers_s": round(ref_s, 4), "velox_s": round(ours_s, 4),
              "ratio": round(ours_s / ref_s, 3), "diffusers_peak_gib": round(ref_gib, 2),
              "velox_peak_gib": round(ours_gib, 2), "bf16_rel_l2_vs_diffusers": round(error, 5),
              "first_call_s": round(first_call_s, 1), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__})


if __name__ == "__main__":
    main()

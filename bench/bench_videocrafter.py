"""VideoCrafter 2 / DynamiCrafter on a GPU: Velox's UNet3D vs the lvdm reference, in the same run.

- ``forward``: VideoCrafter 2 UNet (``inference_t2v_512_v2.0.yaml``), batch 2, 320x512x16 (40x64 latent),
  77 text tokens, fp16 weights. With ``--reference-dir`` (a folder holding ``vc/``, a checkout of
  AILab-CVC/VideoCrafter, as ``scripts/golden/make_videocrafter_golden.py`` uses; never committed) the
  reference ``UNetModel`` gets the same weights and runs under fp16 autocast with its einsum attention
  (the baseline: 230 ms on an H100, ``shared/reference/baselines.md``); the outputs are compared.
- ``dc1024``: DynamiCrafter 1024 UNet (8 input channels, image cross-attention, 77 + 16x16 context
  tokens) at 576x1024x16 (72x128 latent), batch 1 and 2 (cond + uncond in one batch, as Velox's
  sampler runs it): seconds and peak memory (target: <= 20 GB).
- ``full``: a whole VideoCrafter 2 video at 320x512x16 through the host path the sampler node takes
  (``host.videocrafter_sampling``: 50 DDIM steps, eta 1, CFG 12, cond + uncond batched) plus the SD
  KL-f8 decode of 16 frames in chunks of 4, random weights: seconds, decode included.

    python bench/bench_videocrafter.py --parts forward dc1024 full --reference-dir /path/to/lvdm_ref [--compile]
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import boot_comfy, cuda_time, emit, peak_gib, register_pack, relative_l2

FRAMES, HEIGHT, WIDTH = 16, 320, 512


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """N(0, 0.02) matrices, unit norm weights, zero biases (in place)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return module


def random_unet(config, dtype=torch.float16, seed: int = 0):
    from velox.models.unet3d import UNet3D

    return randomize(UNet3D(config, device="cuda", dtype=dtype).eval(), seed)


def reference_unet(reference_dir: Path, config, state_dict):
    """lvdm's UNetModel with the VideoCrafter 2 flags, same weights (fp32 storage, fp16 autocast)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "golden"))
    from make_videocrafter_golden import load_reference

    ref = load_reference(reference_dir / "vc")
    # the baseline (230 ms) is lvdm's einsum attention; a device with xformers would switch spatial layers
    sys.modules["lvdm.modules.attention"].XFORMERS_IS_AVAILBLE = False
    net = ref.unet.UNetModel(
        in_channels=config.in_channels, out_channels=4, model_channels=config.model_channels,
        num_res_blocks=config.num_res_blocks, attention_resolutions=list(config.attention_resolutions),
        channel_mult=list(config.channel_mult), num_head_channels=64, transformer_depth=1, context_dim=1024,
        use_linear=True, use_checkpoint=False, temporal_conv=True, temporal_attention=True,
        temporal_selfatt_only=True, use_relative_position=False, use_causal_attention=False, temporal_length=16,
        addition_attention=True, fps_cond=True)
    net.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return net.cuda().eval()


def part_forward(args) -> None:
    from velox.models.unet3d import UNet3DConfig

    config = UNet3DConfig()
    ours = random_unet(config)
    x = torch.randn(2, 4, FRAMES, HEIGHT // 8, WIDTH // 8, device="cuda", dtype=torch.float16)
    t = torch.tensor([500, 500], device="cuda")
    context = torch.randn(2, 77, 1024, device="cuda", dtype=torch.float16)
    fps = torch.tensor([28, 28], device="cuda")
    with torch.no_grad():
        seconds = cuda_time(lambda: ours(x, t, context, fps=fps))
        peak = peak_gib(lambda: ours(x, t, context, fps=fps))
        record = {"bench": "videocrafter2_unet_forward", "impl": "velox", "batch": 2, "shape": "320x512x16",
                  "seconds": seconds, "peak_gib": peak}
        if args.compile:
            compiled = torch.compile(ours)
            record["seconds_compiled"] = cuda_time(lambda: compiled(x, t, context, fps=fps), warmup=3, repeat=10)
        if args.reference_dir:
            mine = ours(x, t, context, fps=fps)
            state = {k: v.detach() for k, v in ours.state_dict().items()}
            del ours
            torch.cuda.empty_cache()
            ref = reference_unet(Path(args.reference_dir), config, state)

            def run_ref():
                with torch.autocast("cuda", dtype=torch.float16):
                    return ref(x, t, context=context, fps=fps)

            ref_seconds = cuda_time(run_ref, warmup=2, repeat=5)
            ref_peak = peak_gib(run_ref)
            record.update(reference_seconds=ref_seconds, reference_peak_gib=ref_peak,
                          ratio=seconds / ref_seconds, relative_l2_vs_reference=relative_l2(mine, run_ref()))
    emit(record)


def part_dc1024(args) -> None:
    from velox.loaders.videocrafter_detect import VARIANTS
    from velox.models.unet3d import UNet3DConfig

    config = replace(UNet3DConfig(), in_channels=8, image_cross_attention=True, default_fps=VARIANTS["dc1024"][5])
    model = random_unet(config)
    for batch in (1, 2):
        x = torch.randn(batch, 8, FRAMES, 72, 128, device="cuda", dtype=torch.float16)
        t = torch.full((batch,), 500, device="cuda")
        context = torch.randn(batch, 77 + 16 * FRAMES, 1024, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            seconds = cuda_time(lambda: model(x, t, context), warmup=1, repeat=3)
            peak = peak_gib(lambda: model(x, t, context))
        emit({"bench": "dynamicrafter1024_unet_forward", "impl": "velox", "batch": batch, "shape": "576x1024x16",
              "seconds": seconds, "peak_gib": peak, "peak_gb": peak * 2**30 / 1e9})


def part_full(args) -> None:
    """50 DDIM steps + decode at 320x512x16 through the sampler node's host path, random weights."""
    boot_comfy(args.comfyui)
    import comfy.model_patcher
    import comfy.sd

    from velox.host.videocrafter_model import VideoCrafterModelConfig
    from velox.host.videocrafter_sampling import resolve_settings, sample_videocrafter
    from velox.loaders.videocrafter_detect import VARIANTS, VideoCrafterVariant
    from velox.models.unet3d import UNet3DConfig

    name, schedule, preset, resampler, concat, default_fps = VARIANTS["vc2"]
    variant = VideoCrafterVariant(name, "vc2", replace(UNet3DConfig(), default_fps=default_fps), schedule, preset)
    config = VideoCrafterModelConfig(variant)
    config.set_inference_dtype(torch.float16, None)
    base = config.get_model({}, device=torch.device("cuda"))
    randomize(base.diffusion_model)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cuda"), offload_device=torch.device("cpu"))
    # the keys core's VAE detection reads to build the SD KL-f8 (ch 128, ch_mult 1,2,4,4) AutoencoderKL
    vae = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
                           "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3),
                           "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)})
    randomize(vae.first_stage_model)
    positive = [[torch.randn(1, 77, 1024), {}]]
    negative = [[torch.randn(1, 77, 1024), {}]]
    latent = {"samples": torch.zeros(1, 4, FRAMES, HEIGHT // 8, WIDTH // 8)}
    settings = resolve_settings(variant, 50, 0.0, 1.0, 0, -1.0, "release")

    def run():
        out = sample_videocrafter(model, positive, negative, latent, 0, settings)["samples"]
        frames = out.transpose(1, 2).flatten(0, 1)
        return torch.cat([vae.decode(chunk) for chunk in frames.split(4)])

    run()  # warm-up: loads the model, autotunes
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    images = run()
    torch.cuda.synchronize()
    emit({"bench": "videocrafter2_full_video", "impl": "velox", "steps": 50, "shape": "320x512x16",
          "seconds_incl_decode": time.perf_counter() - start, "frames": int(images.shape[0]),
          "peak_gib": torch.cuda.max_memory_allocated() / 2**30})


PARTS = {"forward": part_forward, "dc1024": part_dc1024, "full": part_full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--reference-dir", default=None, help="folder with vc/ (AILab-CVC/VideoCrafter checkout)")
    parser.add_argument("--comfyui", default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of Velox's UNet (forward)")
    args = parser.parse_args()
    register_pack()
    torch.backends.cuda.matmul.allow_tf32 = True
    for part in args.parts:
        PARTS[part](args)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

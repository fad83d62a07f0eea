"""Wan 2.1 / 2.2 on an H100: Velox's loaders vs ComfyUI 0.3.75 native, in the same run.

- ``forward``: Wan-14B T2V transformer, 480×832×81 (21×60×104 latent, 32 760 tokens), 512 text
  tokens, bf16. Native = ``comfy.sd.load_diffusion_model_state_dict`` on official names; Velox = the
  same random weights renamed to the diffusers layout and loaded through ``sniff_wan`` +
  ``build_wan_model`` (what ``VeloxWanLoader`` does).
- ``vae``: Wan 2.1 VAE decode of 81 frames at 480×832 through core's VAE object (what VAEDecode
  calls) and the module alone; native ``comfy.sd.VAE`` vs ``load_wan_vae``'s path; peak memory at 21
  and 81 frames, to show that the causal decoder's temporal chunking keeps it flat.
- ``lightning``: a full Wan 2.2 A14B I2V Lightning run, both 14B experts, 480×832×81: core
  ``WanImageToVideo`` (VAE encode), ``VeloxWanExpertSampler`` preset ``wan22_lightning`` (2 + 2 Euler
  steps, CFG 1), VAE decode. Reports seconds, the peak, and which experts are resident after.

    python bench/bench_wan.py --parts forward vae lightning
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from common import (
    boot_comfy,
    cuda_time,
    emit,
    import_stubbing_missing,
    peak_gib,
    register_pack,
    relative_l2,
    wall_time,
)

WAN_14B = dict(dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096, out_dim=16, num_heads=40, num_layers=40)
FRAMES, HEIGHT, WIDTH = 81, 480, 832
LATENT = (1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)


def random_wan_state_dict(in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Official-name bf16 weights of core's WanModel at 14B, made on the GPU, kept on the CPU."""
    import comfy.ldm.wan.model
    import comfy.ops

    torch.manual_seed(seed)
    net = comfy.ldm.wan.model.WanModel(model_type="t2v", in_dim=in_dim, **WAN_14B, device="cuda",
                                       dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    state_dict = {}
    for key, value in net.state_dict().items():
        value.normal_(0, 0.02)
        state_dict[key] = value.to("cpu", non_blocking=False)
    del net
    torch.cuda.empty_cache()
    return state_dict


def free_everything() -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.cleanup_models()
    gc.collect()
    torch.cuda.empty_cache()


def forward_inputs(in_dim: int = 16):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(*LATENT[:1], in_dim, *LATENT[2:], device="cuda", dtype=torch.bfloat16, generator=g)
    context = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    return x, torch.tensor([500.0], device="cuda"), context


def time_forward(patcher, label: str) -> tuple[float, float, torch.Tensor]:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    net = patcher.model.diffusion_model
    x, t, context = forward_inputs()
    with torch.inference_mode():
        seconds = cuda_time(lambda: net(x, t, context), warmup=1, repeat=3)
        peak = peak_gib(lambda: net(x, t, context))
        out = net(x, t, context).float().cpu()
    print(f"{label}: {seconds:.3f} s, peak {peak:.1f} GiB", flush=True)
    return seconds, peak, out


def bench_forward() -> None:
    import comfy.sd

    from velox.host.wan_loading import build_wan_model
    from velox.loaders.wan_detect import sniff_wan
    from velox.loaders.wan_keys import official_to_diffusers

    official = random_wan_state_dict(in_dim=16, seed=0)
    native = comfy.sd.load_diffusion_model_state_dict(dict(official), model_options={"dtype": torch.bfloat16})
    native_s, native_gib, native_out = time_forward(native, "native")
    del native
    free_everything()
    started = time.perf_counter()
    variant, canonical = sniff_wan(official_to_diffusers(official))
    ours = build_wan_model(canonical, variant, dtype=torch.bfloat16)
    load_s = time.perf_counter() - started
    ours_s, ours_gib, ours_out = time_forward(ours, "velox")
    emit({"bench": "wan14b_t2v_forward_480x832x81", "native_s": round(native_s, 4), "velox_s": round(ours_s, 4),
          "ratio": round(ours_s / native_s, 4), "target": 1.0, "native_peak_gib": round(native_gib, 2),
          "velox_peak_gib": round(ours_gib, 2), "velox_load_from_diffusers_layout_s": round(load_s, 1),
          "variant": variant.describe(), "rel_l2_vs_native": relative_l2(ours_out, native_out),
          "device": torch.cuda.get_device_name()})
    del ours, official, canonical
    free_everything()


def random_wan_vae_state_dict() -> dict[str, torch.Tensor]:
    import comfy.ldm.wan.vae

    torch.manual_seed(0)
    vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    for value in vae.state_dict().values():  # core's ops skip init: give every tensor a scale
        value.normal_(0, 0.02) if value.dim() > 1 else value.fill_(1.0)
    return {key: value.clone() for key, value in vae.state_dict().items()}


def bench_vae(resident_gib: float = 0.0, conv3d_workaround: bool = False) -> None:
    """``resident_gib``: hold that much GPU memory first (an expert's weights, as in a real run);
    ``conv3d_workaround``: force core's cuDNN conv3d memory-bug workaround (core applies it only for
    torch 2.9–2.10)."""
    import comfy.model_management
    import comfy.ops
    import comfy.sd

    from velox.loaders.wan_vae_keys import canonicalize_wan_vae_state_dict

    comfy.ops.NVIDIA_MEMORY_CONV_BUG_WORKAROUND = conv3d_workaround or comfy.ops.NVIDIA_MEMORY_CONV_BUG_WORKAROUND
    resident = torch.empty(int(resident_gib * 2**30), dtype=torch.uint8, device="cuda")

    weights = random_wan_vae_state_dict()
    native = comfy.sd.VAE(sd=dict(weights))
    ours = comfy.sd.VAE(sd=canonicalize_wan_vae_state_dict(dict(weights)))  # load_wan_vae without the file read
    for frames in (21, FRAMES):
        latent = torch.randn(1, 16, (frames - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
        row = {"bench": "wan21_vae_decode_480x832", "frames": frames, "resident_gib": resident_gib,
               "conv3d_workaround": comfy.ops.NVIDIA_MEMORY_CONV_BUG_WORKAROUND, "device": torch.cuda.get_device_name()}
        outs = {}
        for name, vae in (("native", native), ("velox", ours)):
            with torch.inference_mode():
                row[f"{name}_first_call_peak_gib"] = round(peak_gib(lambda: vae.decode(latent)), 2)
                row[f"{name}_node_s"] = round(wall_time(lambda: vae.decode(latent), warmup=1, repeat=3), 4)
                row[f"{name}_node_peak_gib"] = round(peak_gib(lambda: vae.decode(latent)), 2)
                comfy.model_management.load_models_gpu([vae.patcher])
                z = latent.to("cuda", vae.vae_dtype)
                row[f"{name}_module_s"] = round(cuda_time(lambda: vae.first_stage_model.decode(z), 1, 3), 4)
                outs[name] = vae.decode(latent)
        row["ratio_node"] = round(row["velox_node_s"] / row["native_node_s"], 4)
        row["ratio_module"] = round(row["velox_module_s"] / row["native_module_s"], 4)
        row["rel_l2_vs_native"] = relative_l2(outs["velox"], outs["native"])
        emit(row)
    del native, ours, resident
    free_everything()


class MemoryLog:
    """GPU memory around the events of one run. ``reset`` keeps the running maximum of all phases, so
    the whole-run peak survives the per-phase resets."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.overall = 0

    def reset(self) -> None:
        torch.cuda.synchronize()
        self.overall = max(self.overall, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    def mark(self, event: str, **extra) -> None:
        torch.cuda.synchronize()
        self.events.append({"event": event, "allocated_gib": gib(torch.cuda.memory_allocated()),
                            "peak_since_last_gib": gib(torch.cuda.max_memory_allocated()), **extra})
        self.reset()

    def peak(self) -> float:
        self.reset()
        return gib(self.overall)


def gib(value: int) -> float:
    return round(value / 2**30, 2)


ORIGINAL_RELEASE: dict = {}


def watch_run(experts: list, log: MemoryLog) -> None:
    """Log memory at the expert hand-over and around every model call (a unet function wrapper)."""
    import velox.host.wan_sampling as wan_sampling

    release = ORIGINAL_RELEASE.setdefault("release", wan_sampling.release_expert)

    def watched_release(done, following):
        log.mark("before_release")
        release(done, following)
        log.mark("after_release")

    def wrapper(apply_model, args):
        log.mark("before_forward")
        out = apply_model(args["input"], args["timestep"], **args["c"])
        log.mark("forward", input=list(args["input"].shape))
        return out

    wan_sampling.release_expert = watched_release
    for expert in experts:
        expert.set_model_unet_function_wrapper(wrapper)


def bench_lightning(runs: int = 2) -> None:
    """The whole I2V run twice: the first pays cuDNN's algorithm search for the VAE's 3-D convolutions
    (its trial workspaces can take all free memory for a moment), the second is the steady state."""
    import comfy.model_management
    import comfy.sd

    from velox.host.wan_loading import build_wan_model
    from velox.loaders.wan_detect import sniff_wan

    WanImageToVideo = import_stubbing_missing("comfy_extras.nodes_wan").WanImageToVideo
    WanExpertSampler = import_stubbing_missing("velox.nodes.wan_sampling_nodes").WanExpertSampler
    experts = []
    for seed in (1, 2):
        variant, weights = sniff_wan(random_wan_state_dict(in_dim=36, seed=seed))
        experts.append(build_wan_model(weights, variant, dtype=torch.bfloat16))
        del weights
    vae = comfy.sd.VAE(sd=random_wan_vae_state_dict())
    g = torch.Generator().manual_seed(3)
    text = [[torch.randn(1, 512, 4096, generator=g), {}]], [[torch.randn(1, 512, 4096, generator=g), {}]]
    start_image = torch.rand(1, HEIGHT, WIDTH, 3, generator=g)
    for run in range(runs):
        log = MemoryLog()
        watch_run(experts, log)
        log.reset()
        started = time.perf_counter()
        out = WanImageToVideo.execute(*text, vae, WIDTH, HEIGHT, FRAMES, 1, start_image=start_image)
        log.mark("vae_encode")
        positive, negative, latent = out.result
        sampled = WanExpertSampler.execute(experts[0], positive, negative, latent, preset="wan22_lightning",
                                           seed=0, steps=4, cfg_high_noise=1.0, cfg_low_noise=1.0,
                                           sampler_name="euler", scheduler="simple", shift=5.0, switch="step",
                                           boundary=0.9, switch_step=2, model_low_noise=experts[1]).result[0]
        log.mark("sampled")
        frames = vae.decode(sampled["samples"])
        log.mark("vae_decode")
        seconds = time.perf_counter() - started
        resident = [m.model for m in comfy.model_management.current_loaded_models if m.model is not None]
        emit({"bench": "wan22_a14b_i2v_lightning_480x832x81_full_run", "run": run + 1,
              "seconds": round(seconds, 2), "peak_gib": log.peak(), "frames": int(frames.shape[-4]),
              "high_expert_resident_after": any(p.is_clone(experts[0]) for p in resident),
              "low_expert_resident_after": any(p.is_clone(experts[1]) for p in resident),
              "memory_events": log.events,
              "note": "each expert is loaded to the GPU once per run; text encoding excluded",
              "device": torch.cuda.get_device_name()})


PARTS = {"forward": bench_forward, "vae": bench_vae, "lightning": bench_lightning}
PART_OPTIONS = {"vae": ("resident_gib", "conv3d_workaround")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--resident-gib", type=float, default=0.0, help="vae: GPU memory held during the decode")
    parser.add_argument("--conv3d-workaround", action="store_true", help="vae: force core's conv3d workaround")
    args = parser.parse_args()
    boot_comfy()
    register_pack()
    for part in args.parts:
        PARTS[part](**{name: getattr(args, name) for name in PART_OPTIONS.get(part, ())})


if __name__ == "__main__":
    main()

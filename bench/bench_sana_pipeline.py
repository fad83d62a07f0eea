"""End to end on ComfyUI's engine: Sana-1.6B, 20 steps of Flow-DPM-Solver at CFG 4.5, 1024², DC-AE decode.

Text encoding excluded (random 300-token conditioning with a mask). Everything runs through the
code the nodes call: ``build_sana_model`` (MODEL), ``sample_latent`` (VeloxSampler) and the
native DC-AE VAE's ``decode`` (core VAEDecode). Also: DC-AE decode alone vs diffusers AutoencoderDC.

    python bench/bench_sana_pipeline.py --modes eager compile
"""

from __future__ import annotations

import argparse

import torch
from common import boot_comfy, cuda_time, emit, peak_gib, register_pack, relative_l2, wall_time


def sana_patcher(dtype: torch.dtype):
    from velox.host.sana_model import build_sana_model
    from velox.models.sana import SANA_PRESETS, SanaTransformer

    torch.manual_seed(0)
    model = SanaTransformer(**SANA_PRESETS["sana_1600m"].model_kwargs(), device="cuda", dtype=dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
    del model
    return build_sana_model(state_dict, dtype=dtype)


def dcae_weights():
    from velox.loaders.dcae_keys import SANA_DCAE_CONFIG
    from velox.tiny.dcae import make_dcae_state_dict

    return SANA_DCAE_CONFIG, make_dcae_state_dict(SANA_DCAE_CONFIG, seed=0)


def conditioning():
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(1, 300, dtype=torch.long)
    mask[:, :60] = 1
    positive = [[torch.randn(1, 300, 2304, generator=g), {"attention_mask": mask}]]
    negative = [[torch.randn(1, 300, 2304, generator=g), {"attention_mask": torch.ones(1, 300, dtype=torch.long)}]]
    return positive, negative


def bench_pipeline(modes: list[str], steps: int, resolution: int) -> None:
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from velox.host.dcae_vae import load_dcae_vae
    from velox.host.sampling import flow_sigmas, sample_latent, sampler_object

    model = sana_patcher(torch.bfloat16)
    _, vae_sd = dcae_weights()
    vae = load_dcae_vae(vae_sd, dtype=torch.bfloat16)
    positive, negative = conditioning()
    latent = {"samples": torch.zeros(1, 32, resolution // 32, resolution // 32)}
    sigmas = flow_sigmas(model, "flow_dpm_solver", steps, 3.0)
    for mode in modes:
        if mode == "eager-cpu-conds":  # A/B: conditioning left on the CPU, as core samplers get it
            import velox.host.sampling as sampling

            sampling.conditioning_on = lambda conditioning, device: conditioning
        patched = model.clone()
        if not mode.startswith("eager"):  # what the loader's compile option does
            set_torch_compile_wrapper(model=patched, backend="inductor", dynamic=False,
                                      mode=None if mode == "compile" else mode)

        def generate():
            out = sample_latent(patched, positive, negative, latent, 0, 4.5, sampler_object("flow_dpm_solver"), sigmas)
            return vae.decode(out["samples"])

        seconds = wall_time(generate, warmup=1 if mode.startswith("eager") else 3, repeat=3)
        emit({"bench": "sana_1600m_t2i_20_steps_with_decode", "mode": mode, "resolution": resolution,
              "velox_s": round(seconds, 4), "target_s": 0.45, "device": torch.cuda.get_device_name()})


def bench_dcae_decode(resolution: int) -> None:
    from diffusers import AutoencoderDC

    from velox.host.dcae_vae import load_dcae_vae

    config, weights = dcae_weights()
    reference = AutoencoderDC(**config.autoencoder_kwargs(), scaling_factor=0.41407).to("cuda", torch.bfloat16)
    reference.load_state_dict(weights, strict=True)
    ours = load_dcae_vae(weights, dtype=torch.bfloat16)
    import comfy.model_management

    comfy.model_management.load_models_gpu([ours.patcher])
    z = torch.randn(1, 32, resolution // 32, resolution // 32, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        error = relative_l2(ours.first_stage_model.decode(z), reference.decode(z).sample)
        ref_s = cuda_time(lambda: reference.decode(z).sample)
        ours_s = cuda_time(lambda: ours.first_stage_model.decode(z))
        node_s = cuda_time(lambda: ours.decode(z), repeat=5)
        ref_gib, ours_gib = peak_gib(lambda: reference.decode(z)), peak_gib(lambda: ours.first_stage_model.decode(z))
    emit({"bench": "dcae_f32c32_decode", "resolution": resolution, "diffusers_s": round(ref_s, 4),
          "velox_s": round(ours_s, 4), "ratio": round(ours_s / ref_s, 3), "velox_vaedecode_node_s": round(node_s, 4),
          "diffusers_peak_gib": round(ref_gib, 2), "velox_peak_gib": round(ours_gib, 2),
          "bf16_rel_l2_vs_diffusers": round(error, 5), "device": torch.cuda.get_device_name()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["eager"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-dcae", action="store_true")
    args = parser.parse_args()
    boot_comfy()
    register_pack()
    if not args.skip_dcae:
        bench_dcae_decode(args.res)
    if not args.skip_pipeline:
        bench_pipeline(args.modes, args.steps, args.res)


if __name__ == "__main__":
    main()

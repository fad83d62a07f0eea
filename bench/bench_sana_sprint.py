"""Issue #7 on an H100: SANA-Sprint one step at 1024², and Sana-1.6B 20 steps at 4096², vs diffusers.

- ``sprint``: Sprint-1.6B, one TrigFlow step at 1024² (guidance 4.5 embedded, one pass), then DC-AE
  decode. Velox = what the nodes call (``build_sana_model``, ``sample_single_pass`` with the TrigFlow
  SAMPLER, the native DC-AE VAE's ``decode``); diffusers = ``SanaSprintPipeline`` with the same
  weights, ``output_type="pt"``. Text encoding excluded from both (random 300-token embeddings).
  Modes: ``eager``; ``compile`` (transformer under ``torch.compile`` in both, the loader's compile
  option for Velox); ``compile-all`` (the DC-AE decoder compiled too, in both).
- ``4k``: Sana 4K (1.6B, PE interpolation) 20 Flow-DPM-Solver steps at CFG 4.5, 4096², decode included
  (Velox: the seam-free 1024 px tiled decode of the ``sana_4k_tiled`` workflow; diffusers:
  ``SanaPipeline``, its VAE tiled). Seconds and peak GiB for both, eager.

    python bench/bench_sana_sprint.py --parts sprint 4k --modes eager compile compile-all
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import boot_comfy, cuda_time, emit, peak_gib, register_pack, wall_time

DTYPE = torch.bfloat16
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
GUIDANCE = 4.5


def shared_weights(preset: str):
    """Random bf16 weights (diffusers' init) as diffusers' transformer and our canonical state dict."""
    from diffusers import SanaTransformer2DModel

    from velox.loaders.sana_keys import canonicalize_sana_state_dict
    from velox.models.sana import SANA_PRESETS
    from velox.tiny.sana import diffusers_transformer_config

    config = {k: v for k, v in diffusers_transformer_config(SANA_PRESETS[preset]).items() if not k.startswith("_")}
    torch.manual_seed(0)
    reference = SanaTransformer2DModel(**config).to("cuda", DTYPE).eval()
    return reference, canonicalize_sana_state_dict({k: v.cpu() for k, v in reference.state_dict().items()})


def dcae_pair():
    from diffusers import AutoencoderDC

    from velox.host.dcae_vae import load_dcae_vae
    from velox.loaders.dcae_keys import SANA_DCAE_CONFIG
    from velox.tiny.dcae import make_dcae_state_dict

    weights = make_dcae_state_dict(SANA_DCAE_CONFIG, seed=0)
    reference = AutoencoderDC(**SANA_DCAE_CONFIG.autoencoder_kwargs(), scaling_factor=0.41407).to("cuda", DTYPE)
    reference.load_state_dict(weights, strict=True)
    return reference, load_dcae_vae(weights, dtype=DTYPE)


def prompt(batch: int = 1, valid: int = 40):
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(batch, 300, 2304, generator=g)
    mask = torch.zeros(batch, 300, dtype=torch.long)
    mask[:, :valid] = 1
    return embeds, mask


def compile_module(owner, name: str) -> None:
    setattr(owner, name, torch.compile(getattr(owner, name), dynamic=False))


def compile_forward(module: torch.nn.Module) -> None:
    """Compile in place: the module tree (and so ModelPatcher's view of it) stays as it is."""
    module.forward = torch.compile(module.forward, dynamic=False)


def bench_sprint(modes: list[str], resolution: int = 1024) -> None:
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from diffusers import SanaSprintPipeline, SCMScheduler

    from velox.host.sana_model import build_sana_model
    from velox.host.sana_sprint import sample_single_pass, sprint_sigmas, trigflow_sampler

    reference, weights = shared_weights("sprint_1600m")
    ref_vae, vae = dcae_pair()
    pipe = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=ref_vae, transformer=reference,
                              scheduler=SCMScheduler(prediction_type="trigflow", sigma_data=0.5))
    pipe.set_progress_bar_config(disable=True)
    model = build_sana_model(weights, dtype=DTYPE)
    embeds, mask = prompt()
    conditioning = [[embeds, {"attention_mask": mask}]]
    latent = {"samples": torch.zeros(1, 32, resolution // 32, resolution // 32)}
    sigmas, sampler = sprint_sigmas(1), trigflow_sampler()
    first = True
    for mode in modes:
        patched = model.clone()
        if mode != "eager" and first:  # compile once per process: later modes keep what is compiled
            compile_module(pipe, "transformer")
            set_torch_compile_wrapper(model=model, backend="inductor", dynamic=False)
            patched, first = model.clone(), False
        if mode == "compile-all":
            compile_forward(pipe.vae.decoder)
            compile_forward(vae.first_stage_model.decoder)

        def run_diffusers():
            return pipe(prompt_embeds=embeds.cuda(), prompt_attention_mask=mask.cuda(), height=resolution,
                        width=resolution, num_inference_steps=1, intermediate_timesteps=None, guidance_scale=GUIDANCE,
                        output_type="pt",
                        use_resolution_binning=False, generator=torch.Generator("cuda").manual_seed(0),
                        return_dict=False)[0]

        def run_velox():
            out = sample_single_pass(patched, conditioning, conditioning, latent, 0, GUIDANCE, sampler, sigmas)
            return vae.decode(out["samples"])

        def run_velox_sampling():
            return sample_single_pass(patched, conditioning, conditioning, latent, 0, GUIDANCE, sampler, sigmas)

        warmup = 1 if mode == "eager" else 3
        with torch.inference_mode():
            ref_s = wall_time(run_diffusers, warmup=warmup, repeat=10)
            ours_s = wall_time(run_velox, warmup=warmup, repeat=10)
            sampling_s = wall_time(run_velox_sampling, warmup=1, repeat=10)
            sampled = run_velox_sampling()["samples"]
            decode_s = wall_time(lambda: vae.decode(sampled), warmup=1, repeat=10)
            ref_gib, ours_gib = peak_gib(run_diffusers), peak_gib(run_velox)
        emit({"bench": "sprint_1600m_1step_1024_with_decode", "mode": mode, "diffusers_s": round(ref_s, 4),
              "velox_s": round(ours_s, 4), "velox_sampling_s": round(sampling_s, 4),
              "velox_decode_node_s": round(decode_s, 4), "ratio": round(ours_s / ref_s, 3), "target_s": 0.05,
              "target_ratio": 0.8, "diffusers_peak_gib": round(ref_gib, 2), "velox_peak_gib": round(ours_gib, 2),
              "device": torch.cuda.get_device_name()})
    pipe = model = reference = None  # free before the next part
    gc.collect()
    torch.cuda.empty_cache()


def bench_4k(steps: int = 20, resolution: int = 4096) -> None:
    import comfy.model_management
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    from velox.host.sampling import flow_sigmas, sample_latent, sampler_object
    from velox.host.sana_model import build_sana_model

    reference, weights = shared_weights("sana_1600m_4k")
    ref_vae, vae = dcae_pair()
    scheduler = DPMSolverMultistepScheduler(flow_shift=6.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=ref_vae, transformer=reference, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    embeds, mask = prompt()
    negative, negative_mask = prompt(valid=300)

    def run_diffusers():
        return pipe(prompt_embeds=embeds.cuda(), prompt_attention_mask=mask.cuda(), negative_prompt=None,
                    negative_prompt_embeds=negative.cuda(), negative_prompt_attention_mask=negative_mask.cuda(),
                    height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=4.5,
                    output_type="pt", use_resolution_binning=False, return_dict=False)[0]

    with torch.inference_mode():
        ref_s = wall_time(run_diffusers, warmup=1, repeat=1)
        ref_gib = peak_gib(run_diffusers)
    pipe = reference = None
    gc.collect()
    torch.cuda.empty_cache()

    model = build_sana_model(weights, dtype=DTYPE)
    positive = [[embeds, {"attention_mask": mask}]]
    negative_cond = [[negative, {"attention_mask": negative_mask}]]
    latent = {"samples": torch.zeros(1, 32, resolution // 32, resolution // 32)}
    sigmas = flow_sigmas(model, "flow_dpm_solver", steps, 6.0)

    def run_velox():
        out = sample_latent(model, positive, negative_cond, latent, 0, 4.5, sampler_object("flow_dpm_solver"), sigmas)
        return vae.decode_tiled(out["samples"], tile_x=32, tile_y=32, overlap=4)

    with torch.inference_mode():
        ours_s = wall_time(run_velox, warmup=1, repeat=1)
        comfy.model_management.soft_empty_cache()
        ours_gib = peak_gib(run_velox)
    emit({"bench": "sana_1600m_4k_20_steps_4096_with_decode", "diffusers_s": round(ref_s, 3),
          "velox_s": round(ours_s, 3), "ratio": round(ours_s / ref_s, 3), "diffusers_peak_gib": round(ref_gib, 2),
          "velox_peak_gib": round(ours_gib, 2), "target_peak_gib": 16,
          "note": "diffusers: SanaPipeline, vae.enable_tiling(); velox: 1024 px tiles, 128 px overlap",
          "device": torch.cuda.get_device_name()})


def bench_decode(resolution: int = 1024) -> None:
    """DC-AE decode alone, module level, one image: memory format and compile, ours vs diffusers."""
    import comfy.model_management

    from velox.host.dcae_vae import DCAE_MEMORY_FORMAT

    reference, vae = dcae_pair()
    comfy.model_management.load_models_gpu([vae.patcher])
    ours = vae.first_stage_model
    z = torch.randn(1, 32, resolution // 32, resolution // 32, device="cuda", dtype=DTYPE)
    runners = {"diffusers": lambda: reference.decode(z).sample, "velox": lambda: ours.decode(z)}
    rows: dict[str, object] = {}

    def measure(label: str) -> None:
        for name, run in runners.items():
            try:
                rows[f"{name}_{label}_s"] = round(cuda_time(run), 5)
            except Exception as error:  # a compile failure of one variant must not lose the others
                rows[f"{name}_{label}_error"] = f"{type(error).__name__}: {str(error)[:200]}"

    with torch.inference_mode():
        for compiled in (False, True):
            if compiled:
                compile_forward(ours.decoder)
                compile_forward(reference.decoder)
            for fmt, memory_format in MEMORY_FORMATS.items():
                ours.to(memory_format=memory_format)
                reference.to(memory_format=memory_format)
                measure(("compiled_" if compiled else "") + fmt)
            if not compiled:
                ours.to(memory_format=DCAE_MEMORY_FORMAT)
                rows["velox_node_path_s"] = round(wall_time(lambda: vae.decode(z), warmup=2, repeat=10), 5)
            emit({"bench": "dcae_decode_formats", "resolution": resolution, **rows,
                  "device": torch.cuda.get_device_name()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["sprint", "4k"], choices=["sprint", "4k", "decode"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "compile-all"])
    args = parser.parse_args()
    boot_comfy()
    register_pack()
    if "sprint" in args.parts:
        bench_sprint(args.modes)
    if "4k" in args.parts:
        bench_4k()
    if "decode" in args.parts:
        bench_decode()


if __name__ == "__main__":
    main()

"""Regenerate the VideoCrafter / DynamiCrafter golden tensors from the lvdm reference (CPU, fp32).

Usage::

    .venv/bin/python scripts/golden/make_videocrafter_golden.py --reference-dir /tmp/lvdm_ref

``--reference-dir`` holds two checkouts, never committed: ``vc/`` (AILab-CVC/VideoCrafter, read at
11bcd76f) and ``dc/`` (Doubiiu/DynamiCrafter, c4533693), each with its ``lvdm/`` package::

    git clone https://github.com/AILab-CVC/VideoCrafter /tmp/lvdm_ref/vc && git -C /tmp/lvdm_ref/vc checkout 11bcd76f
    git clone https://github.com/Doubiiu/DynamiCrafter /tmp/lvdm_ref/dc && git -C /tmp/lvdm_ref/dc checkout c4533693

Only the
network modules, the Resamplers and the DDIM samplers are imported; ``utils.utils`` (used by
``lvdm.basics`` for config instantiation) is stubbed (tqdm too when absent), xformers is absent so lvdm
runs its einsum path. Needs einops.

Weights are not stored: ``tiny.videocrafter.deterministic_weights`` fills reference and ours alike
(the key names are the same). Written to ``tests/data/videocrafter/``:

- ``unet_<variant>.safetensors``: inputs, the reference output (explicit and default fps), the key
  shapes of the reference module (metadata ``shapes``) and a weight checksum.
- ``resampler_<kind>.safetensors``: image tokens in, context tokens out.
- ``ddim_<name>.safetensors``: x_T, the per-step noises, the conditioning, the reference sample.

The DDIM sampler is the reference's own class; the "model" it calls is a stand-in that holds the
reference schedule buffers (``make_beta_schedule``, ``rescale_zero_terminal_snr`` and the
``scale_arr`` formulas of ``LatentDiffusion.__init__``) and runs the reference UNet as lvdm's
``DiffusionWrapper`` does (channel concat for ``hybrid``), because LatentDiffusion itself needs
pytorch_lightning, the VAE and OpenCLIP.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from velox_import import register_pack  # noqa: E402

register_pack()
from velox.tiny.videocrafter import (  # noqa: E402
    FRAMES,
    IMAGE_TOKENS,
    LATENT_SIDE,
    TEXT_TOKENS,
    TINY_RESAMPLERS,
    TINY_UNETS,
    fill_deterministic,
    weights_checksum,
)

OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "videocrafter"
REPO_OF_VARIANT = {"vc1": "vc", "vc2": "vc", "vc1_i2v": "vc", "dc256": "dc", "dc512": "dc"}
BATCH = 2


# ------------------------------------------------------------------------------------ reference import
def load_reference(root: Path) -> types.SimpleNamespace:
    """Import one lvdm checkout (purging any other one first) and return its modules."""
    for name in [n for n in sys.modules if n == "lvdm" or n.startswith(("lvdm.", "utils"))]:
        del sys.modules[name]
    stub = types.ModuleType("utils.utils")
    stub.instantiate_from_config = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stub"))
    sys.modules["utils"] = types.ModuleType("utils")
    sys.modules["utils.utils"] = stub
    try:
        import tqdm  # noqa: F401  (lvdm's DDIM imports it for its progress bar)
    except ModuleNotFoundError:
        sys.modules["tqdm"] = types.ModuleType("tqdm")
        sys.modules["tqdm"].tqdm = lambda iterable, **_: iterable
    sys.path.insert(0, str(root))
    try:
        import lvdm.models.samplers.ddim as ddim
        import lvdm.models.utils_diffusion as utils_diffusion
        import lvdm.modules.networks.openaimodel3d as unet
        resampler_name = "resampler" if (root / "lvdm/modules/encoders/resampler.py").exists() else "ip_resampler"
        resampler = __import__(f"lvdm.modules.encoders.{resampler_name}", fromlist=["Resampler"])
    finally:
        sys.path.remove(str(root))
    ddim.DDIMSampler.register_buffer = lambda self, name, attr: setattr(self, name, attr)  # no .cuda()
    return types.SimpleNamespace(unet=unet, resampler=resampler, ddim=ddim, utils=utils_diffusion)


def reference_unet(ref, variant: str):
    cfg = TINY_UNETS[variant]
    kwargs = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
        num_res_blocks=cfg.num_res_blocks, attention_resolutions=list(cfg.attention_resolutions),
        channel_mult=list(cfg.channel_mult), num_head_channels=cfg.num_head_channels,
        transformer_depth=cfg.transformer_depth, context_dim=cfg.context_dim, use_linear=True,
        use_checkpoint=False, temporal_conv=cfg.temporal_conv, temporal_attention=True,
        temporal_selfatt_only=True, use_relative_position=cfg.use_relative_position,
        use_causal_attention=cfg.use_causal_attention, temporal_length=cfg.temporal_length,
        addition_attention=cfg.addition_attention)
    if REPO_OF_VARIANT[variant] == "vc":
        kwargs.update(fps_cond=cfg.fps_cond, use_image_attention=cfg.image_cross_attention)
    else:
        kwargs.update(image_cross_attention=cfg.image_cross_attention, fs_condition=cfg.fps_cond,
                      image_cross_attention_scale_learnable=cfg.image_cross_attention_scale_learnable,
                      default_fs=cfg.default_fps, dropout=0.1)
    return fill_deterministic(ref.unet.UNetModel(**kwargs).eval())


def reference_resampler(ref, kind: str):
    c = TINY_RESAMPLERS[kind]
    kwargs = dict(dim=c.dim, depth=c.depth, dim_head=c.dim_head, heads=c.heads, num_queries=c.num_queries,
                  embedding_dim=c.embedding_dim, output_dim=c.output_dim, ff_mult=c.ff_mult)
    if c.video_length is not None:
        kwargs["video_length"] = c.video_length
    return fill_deterministic(ref.resampler.Resampler(**kwargs).eval())


def run_unet(module, variant: str, x, t, context, fps):
    key = "fps" if REPO_OF_VARIANT[variant] == "vc" else "fs"
    extra = {} if fps is None else {key: fps}
    return module(x, t, context=context, **extra)


def shapes_metadata(module) -> str:
    return json.dumps({k: list(v.shape) for k, v in module.state_dict().items()})


# ------------------------------------------------------------------------------------ inputs
def gen(seed: int):
    return torch.Generator().manual_seed(seed)


def unet_inputs(variant: str, context_tokens: torch.Tensor | None, seed: int) -> dict[str, torch.Tensor]:
    cfg = TINY_UNETS[variant]
    g = gen(seed)
    x = torch.randn(BATCH, cfg.in_channels, FRAMES, LATENT_SIDE, LATENT_SIDE, generator=g)
    text = torch.randn(BATCH, TEXT_TOKENS, cfg.context_dim, generator=g)
    context = text if context_tokens is None else torch.cat([text, context_tokens], dim=1)
    return {"x": x, "t": torch.tensor([37, 811]), "context": context, "fps": torch.tensor([8, 28])}


def image_embeddings(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, IMAGE_TOKENS, TINY_RESAMPLERS["dc"].embedding_dim, generator=gen(seed))


# ------------------------------------------------------------------------------------ DDIM stand-in
class ReferenceModelShim(torch.nn.Module):
    """The attributes lvdm's DDIMSampler reads from LatentDiffusion, computed by the reference code."""

    def __init__(self, ref, unet, variant, parameterization="eps", zero_snr=False, scale=None):
        super().__init__()
        self.unet, self.variant, self.parameterization = unet, variant, parameterization
        betas = ref.utils.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        if zero_snr:
            betas = ref.utils.rescale_zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.num_timesteps = 1000
        self.betas = f32(betas)
        self.alphas_cumprod = f32(alphas_cumprod)
        self.alphas_cumprod_prev = f32(np.append(1.0, alphas_cumprod[:-1]))
        self.sqrt_alphas_cumprod = f32(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = f32(np.sqrt(1.0 - alphas_cumprod))
        self.use_scale = self.use_dynamic_rescale = scale is not None
        if scale is not None:  # LatentDiffusion: linspace(1, b, 400) ++ full(1000, b) (VC, no fix_scale_bug; DC)
            self.scale_arr = f32(np.concatenate((np.linspace(1.0, scale, 400), np.full(1000, scale))))
        self.device = torch.device("cpu")

    def apply_model(self, x, t, cond, **kwargs):
        if cond.get("c_concat"):
            x = torch.cat([x] + cond["c_concat"], dim=1)
        return run_unet(self.unet, self.variant, x, t, torch.cat(cond["c_crossattn"], 1), kwargs.get("fps"))

    def predict_start_from_z_and_v(self, x_t, t, v):
        a, s = self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        return a.view(-1, 1, 1, 1, 1) * x_t - s.view(-1, 1, 1, 1, 1) * v

    def predict_eps_from_z_and_v(self, x_t, t, v):
        a, s = self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        return a.view(-1, 1, 1, 1, 1) * v + s.view(-1, 1, 1, 1, 1) * x_t


DDIM_CASES = {
    # name: variant, steps, eta, cfg, model kwargs, sample kwargs
    "vc2_eta0": ("vc2", 4, 0.0, 12.0, dict(scale=0.7), {}),
    "vc2_eta1": ("vc2", 4, 1.0, 12.0, dict(scale=0.7), {}),
    "dc512_eta0": ("dc512", 4, 0.0, 7.5, dict(parameterization="v", zero_snr=True, scale=0.7),
                   dict(timestep_spacing="uniform_trailing", guidance_rescale=0.7)),
    "dc512_eta1": ("dc512", 4, 1.0, 7.5, dict(parameterization="v", zero_snr=True, scale=0.7),
                   dict(timestep_spacing="uniform_trailing", guidance_rescale=0.7)),
    "dc256_eta1": ("dc256", 4, 1.0, 7.5, {}, {}),
}


def make_ddim_case(ref, name: str, seed: int) -> dict[str, torch.Tensor]:
    variant, steps, eta, cfg_scale, model_kwargs, sample_kwargs = DDIM_CASES[name]
    shim = ReferenceModelShim(ref, reference_unet(ref, variant), variant, **model_kwargs)
    g = gen(seed)
    shape = (BATCH, 4, FRAMES, LATENT_SIDE, LATENT_SIDE)
    dim = TINY_UNETS[variant].context_dim
    extra = 16 * FRAMES if variant.startswith("dc") else 0
    tensors = {
        "x_T": torch.randn(shape, generator=g),
        "noises": torch.randn((steps, *shape), generator=g),
        "cond": torch.randn(BATCH, TEXT_TOKENS + extra, dim, generator=g),
        "uncond": torch.randn(BATCH, TEXT_TOKENS + extra, dim, generator=g),
        "fps": torch.tensor([24, 10]),
    }
    concat = []
    if TINY_UNETS[variant].in_channels == 8:
        tensors["concat"] = torch.randn(shape, generator=g)
        concat = [tensors["concat"]]
    queue = list(tensors["noises"])
    ref.ddim.noise_like = lambda shape, device, repeat=False: queue.pop(0)
    sampler = ref.ddim.DDIMSampler(shim)
    cond = {"c_crossattn": [tensors["cond"]], "c_concat": concat}
    uncond = {"c_crossattn": [tensors["uncond"]], "c_concat": concat}
    with torch.no_grad():
        sample, _ = sampler.sample(S=steps, batch_size=BATCH, shape=shape[1:], conditioning=cond, eta=eta,
                                   x_T=tensors["x_T"].clone(), unconditional_guidance_scale=cfg_scale,
                                   unconditional_conditioning=uncond, verbose=False, fps=tensors["fps"],
                                   **sample_kwargs)
    assert not queue, "the sampler drew fewer noises than steps"
    tensors["sample"] = sample.contiguous()
    tensors["timesteps"] = torch.as_tensor(np.ascontiguousarray(sampler.ddim_timesteps))
    return tensors


# ------------------------------------------------------------------------------------ main
def make_all(reference_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    refs = {name: None for name in ("vc", "dc")}
    for repo in ("vc", "dc"):
        refs[repo] = load_reference(reference_dir / repo)
        ref = refs[repo]
        tokens = {}
        for kind in ("vc1_i2v",) if repo == "vc" else ("dc",):
            module = reference_resampler(ref, kind)
            emb = image_embeddings(seed=11)
            with torch.no_grad():
                tokens[kind] = module(emb)
            save_file({"image_embeds": emb, "tokens": tokens[kind]}, out / f"resampler_{kind}.safetensors",
                      metadata={"shapes": shapes_metadata(module), "checksum": str(weights_checksum(module))})
        for seed, variant in enumerate(v for v, r in REPO_OF_VARIANT.items() if r == repo):
            module = reference_unet(ref, variant)
            image = tokens.get("vc1_i2v" if variant == "vc1_i2v" else "dc") if TINY_UNETS[
                variant].image_cross_attention else None
            inputs = unet_inputs(variant, image, seed=100 + seed)
            with torch.no_grad():
                inputs["out"] = run_unet(module, variant, inputs["x"], inputs["t"], inputs["context"], inputs["fps"])
                if TINY_UNETS[variant].fps_cond:
                    inputs["out_default_fps"] = run_unet(module, variant, inputs["x"], inputs["t"],
                                                         inputs["context"], None)
            save_file({k: v.contiguous() for k, v in inputs.items()}, out / f"unet_{variant}.safetensors",
                      metadata={"shapes": shapes_metadata(module), "checksum": str(weights_checksum(module))})
        for seed, name in enumerate(n for n, case in DDIM_CASES.items() if REPO_OF_VARIANT[case[0]] == repo):
            save_file(make_ddim_case(ref, name, seed=200 + seed), out / f"ddim_{name}.safetensors")
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {len(list(out.glob('*.safetensors')))} files, {total / 1e6:.2f} MB to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", type=Path, default=Path("/tmp/lvdm_ref"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    make_all(args.reference_dir, args.out)


if __name__ == "__main__":
    main()

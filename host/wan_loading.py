"""Files and folders -> Wan's MODEL, VAE and umT5 CLIP, built by ComfyUI core's own machinery.

Core already has the Wan backbone (``comfy.ldm.wan.model.WanModel`` / ``VaceWanModel``), the VAE
and umT5; what it lacks is the layouts. So every loader here maps keys onto the official names
(``loaders.wan_keys`` / ``wan_vae_keys``) and hands the state dict to core:
``comfy.sd.load_diffusion_model_state_dict`` (detection, dtype choice, ``custom_operations`` for
quantized ops later), ``comfy.sd.VAE(sd=...)`` and ``comfy.sd.load_text_encoder_state_dicts``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_patcher
import comfy.sd
import torch

from ..errors import VeloxLoadError
from ..loaders.checkpoint_files import (
    load_state_dict,
    read_component,
    resolve_diffusers_component,
    resolve_hf_cache_repo,
)
from ..loaders.wan_detect import WanVariant, sniff_wan
from ..loaders.wan_vae_keys import canonicalize_wan_vae_state_dict
from .model_paths import HF_CACHE_PREFIX

# Wan 2.2 A14B expert folders, (high noise = sigma above the boundary, low noise): diffusers, official
EXPERT_FOLDER_PAIRS = (("transformer", "transformer_2"), ("high_noise_model", "low_noise_model"))
EXPERTS = ("high_noise", "low_noise")
EXPERT_PAIR_EXPECTED = ("a Wan 2.2 A14B folder with transformer/ + transformer_2/ (diffusers) or "
                        "high_noise_model/ + low_noise_model/ (official)")
UMT5_EXPECTED = ("umT5-XXL: ComfyUI's umt5_xxl_*.safetensors, or a diffusers folder with "
                 "text_encoder/ (UMT5EncoderModel) and tokenizer/spiece.model")


def resolve_source(source: str | Path) -> Path:
    """A path, or ``"hf-cache: Org/Name"`` for a repository already in the local Hugging Face cache."""
    if isinstance(source, str) and source.startswith(HF_CACHE_PREFIX):
        return resolve_hf_cache_repo(source[len(HF_CACHE_PREFIX):])
    return Path(source)


# ----------------------------------------------------------------------------------------------
# transformer
# ----------------------------------------------------------------------------------------------


def load_wan_model(
    source: str | Path, dtype: torch.dtype | None = None, expert: str = "high_noise",
    model_options: dict | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """A Wan transformer of any layout as a ComfyUI MODEL on core's WanModel / VaceWanModel.

    source: a file (official, ComfyUI-prefixed, diffusers), a diffusers or official folder (sharded
    too), a Wan 2.2 folder (``expert`` "high_noise" picks ``transformer/`` / ``high_noise_model/``,
    "low_noise" ``transformer_2/`` / ``low_noise_model/``), or ``"hf-cache: Org/Name"``.
    model_options go to core (``custom_operations`` for quantized ops).
    """
    path = resolve_source(source)
    pair = _expert_folders(path)
    component = pair[EXPERTS.index(expert)] if pair else "transformer"
    variant, canonical = sniff_wan(_read_transformer(path, component), path)
    return build_wan_model(canonical, variant, path, dtype=dtype, model_options=model_options)


def load_wan_experts(
    source: str | Path, dtype: torch.dtype | None = None, model_options: dict | None = None
) -> tuple[comfy.model_patcher.ModelPatcher, comfy.model_patcher.ModelPatcher]:
    """Both experts of a Wan 2.2 A14B folder (diffusers or official): (high noise, low noise)."""
    folder = resolve_source(source)
    pair = _expert_folders(folder)
    if pair is None:
        raise VeloxLoadError(folder, "holds one model, not a Wan 2.2 expert pair (no transformer_2/ or "
                             "low_noise_model/ folder)", EXPERT_PAIR_EXPECTED)
    (high_variant, high_sd), (low_variant, low_sd) = [
        sniff_wan(_read_transformer(folder, component), folder / component) for component in pair]
    if not high_variant.same_architecture(low_variant):
        raise VeloxLoadError(folder, f"the two experts differ: {pair[0]}/ is {high_variant.describe()}, "
                             f"{pair[1]}/ is {low_variant.describe()}",
                             "two experts of one Wan 2.2 model (same size and input channels)")
    return (build_wan_model(high_sd, high_variant, folder / pair[0], dtype, model_options),
            build_wan_model(low_sd, low_variant, folder / pair[1], dtype, model_options))


def _expert_folders(path: Path) -> tuple[str, str] | None:
    """The (high, low) expert subfolders of a Wan 2.2 folder; None for anything else."""
    if not path.is_dir():
        return None
    return next((pair for pair in EXPERT_FOLDER_PAIRS if all((path / name).is_dir() for name in pair)), None)


def _read_transformer(path: Path, component: str) -> dict[str, torch.Tensor]:
    return read_component(path, component)[0]


def build_wan_model(
    state_dict: dict[str, torch.Tensor], variant: WanVariant, path: str | Path | None = None,
    dtype: torch.dtype | None = None, model_options: dict | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """Canonical (official-name) Wan weights -> core's model, every parameter checked to be filled."""
    options = dict(model_options or {})
    if dtype is not None:
        options["dtype"] = dtype
    keys = set(state_dict)
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(state_dict), model_options=options)
    if patcher is None:
        raise VeloxLoadError(path, f"ComfyUI could not build {variant.describe()}", "a Wan transformer core knows")
    expected = set(patcher.model.diffusion_model.state_dict())
    missing = sorted(expected - keys)
    if missing:
        raise VeloxLoadError(path, f"weights do not fill {variant.describe()}: {len(missing)} tensor(s) "
                             f"missing, e.g. {missing[:4]}", "a complete Wan transformer checkpoint")
    logging.info("Velox: %s loaded from %s", variant.describe(), path or "state dict")
    return patcher


# ----------------------------------------------------------------------------------------------
# VAE and umT5
# ----------------------------------------------------------------------------------------------


def load_wan_vae(source: str | Path) -> comfy.sd.VAE:
    """The Wan VAE (official / ComfyUI / Kijai file, diffusers ``AutoencoderKLWan`` file or folder)
    as core's native VAE."""
    path = resolve_source(source)
    state_dict, _ = read_component(path, "vae")
    vae = comfy.sd.VAE(sd=canonicalize_wan_vae_state_dict(state_dict, path))
    if not getattr(vae, "latent_dim", None) == 3:
        raise VeloxLoadError(path, "ComfyUI did not take it for a Wan VAE", "a Wan 2.1 / 2.2 VAE")
    return vae


def load_umt5(source: str | Path, cpu: bool = False):
    """umT5-XXL as Wan's CLIP: ComfyUI's single file (through core's ``load_clip``, so scaled-fp8 and
    quantization metadata keep working), or a diffusers ``text_encoder/`` + ``tokenizer/`` folder."""
    path = resolve_source(source)
    cpu_device = torch.device("cpu")
    options = {"load_device": cpu_device, "offload_device": cpu_device, "initial_device": cpu_device} if cpu else {}
    try:
        if not path.is_dir():
            return comfy.sd.load_clip([str(path)], clip_type=comfy.sd.CLIPType.WAN, model_options=options)
        return comfy.sd.load_text_encoder_state_dicts([umt5_state_dict(path)], clip_type=comfy.sd.CLIPType.WAN,
                                                      model_options=options)
    except (RuntimeError, KeyError, ValueError) as error:
        if isinstance(error, VeloxLoadError):
            raise
        raise VeloxLoadError(path, f"ComfyUI could not load it as umT5 ({str(error)[:200]})", UMT5_EXPECTED) from None


def umt5_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """umT5 tensors under core's names (transformers' T5 names, which core keeps), tokenizer included."""
    if not path.is_dir():
        return load_state_dict(path)
    encoder = resolve_diffusers_component(path, "text_encoder")
    state_dict: dict[str, torch.Tensor] = {}
    for weight_file in encoder.weight_files:
        state_dict.update(load_state_dict(weight_file))
    state_dict.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    if "shared.weight" not in state_dict:
        raise VeloxLoadError(path, f"text_encoder/ is not a umT5 encoder (first keys: {list(state_dict)[:4]})",
                             UMT5_EXPECTED)
    spiece = next((p for p in (path / "tokenizer" / "spiece.model", path / "spiece.model") if p.is_file()), None)
    if spiece is None:
        raise VeloxLoadError(path, "has no tokenizer/spiece.model", UMT5_EXPECTED)
    state_dict["spiece_model"] = torch.frombuffer(bytearray(spiece.read_bytes()), dtype=torch.uint8)
    return state_dict

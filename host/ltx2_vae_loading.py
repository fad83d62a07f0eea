"""The LTX-2 video VAE (SANA-Video 720p's) as ComfyUI core's native VAE.

Core already computes it: ``comfy.sd.VAE`` builds ``comfy.ldm.lightricks.vae.causal_video_autoencoder.
VideoVAE`` for any state dict with ``decoder.up_blocks.0.res_blocks.0.conv1.conv.weight``, from the
config Lightricks' safetensors carry in their metadata (``{"config": {"vae": ...}}``). What core lacks
is the diffusers layout and a config for files without that metadata. So the loader maps the keys onto
the official names (``loaders.ltx2_vae_keys``), derives core's config from the weights (and the
diffusers config.json), checks that the weights fill exactly the module that config builds, and hands
both to ``comfy.sd.VAE`` the way core reads them: through ``metadata``.

The latent statistics go where core un-normalizes with them, so ``VAE.decode`` takes SANA-Video's
normalized latents as ``SanaVideoPipeline`` does before ``vae.decode``: ``z * latents_std + latents_mean``.
(diffusers' ``scaling_factor`` is 1.0 in the release; the SANA-Video pipelines ignore it, and so does this.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx_vae
import comfy.sd
import torch

from ..errors import VeloxLoadError
from ..loaders.checkpoint_files import read_component, read_safetensors_metadata, resolve_diffusers_component
from ..loaders.ltx2_vae_keys import (
    DIFFUSERS_CLASS,
    LTX2_VAE_EXPECTED,
    UNUSED_STATISTICS,
    canonicalize_ltx2_vae_state_dict,
    core_vae_config,
)
from .wan_loading import resolve_source


def load_ltx2_vae(source: str | Path) -> comfy.sd.VAE:
    """An LTX-2 video VAE as core's VAE (128 latent channels, 8 x 32 x 32): a diffusers
    ``AutoencoderKLLTX2Video`` folder (``vae/`` or the component itself) or file, the official / ComfyUI
    safetensors (``vae.``-prefixed inside a whole LTX-2 checkpoint), or ``"hf-cache: Org/Name"``.
    Files are read as every loader reads them (safetensors, or a weights-only ``.pth``; pickles refused);
    any VAE core's module cannot compute as diffusers does is refused with a VeloxLoadError naming the file."""
    path = resolve_source(source)
    weight_file = _weight_file(path)
    state_dict, diffusers_config = read_component(path, "vae")
    class_name = (diffusers_config or {}).get("_class_name")
    if class_name not in (None, DIFFUSERS_CLASS):
        raise VeloxLoadError(path, f"its config.json describes a {class_name}, not an {DIFFUSERS_CLASS}",
                             LTX2_VAE_EXPECTED)
    weights = canonicalize_ltx2_vae_state_dict(state_dict, path)
    config = _release_metadata_config(weight_file, path) or core_vae_config(
        {k: tuple(v.shape) for k, v in weights.items()}, diffusers_config, path)
    _check_weights_fill(weights, config, path)
    vae = comfy.sd.VAE(sd=_with_unused_statistics(weights), metadata={"config": json.dumps({"vae": config})})
    if not (getattr(vae, "latent_dim", None) == 3 and vae.latent_channels == 128):
        raise VeloxLoadError(path, "ComfyUI did not take it for an LTX video VAE", LTX2_VAE_EXPECTED)
    return vae


def _weight_file(path: Path) -> Path:
    """The weight file (the first of a folder's), whose safetensors metadata may hold core's config."""
    if path.is_dir():
        return resolve_diffusers_component(path, "vae").weight_files[0]
    if path.is_file():
        return path
    raise VeloxLoadError(path, "file not found", LTX2_VAE_EXPECTED)


def _release_metadata_config(weight_file: Path, path: Path) -> dict | None:
    """Core's own config from Lightricks' safetensors metadata (``config`` -> ``vae``), when present."""
    if not weight_file.name.lower().endswith(".safetensors"):
        return None
    text = read_safetensors_metadata(weight_file).get("config")
    try:
        config = json.loads(text).get("vae") if text else None
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(config, dict) and config.get("timestep_conditioning"):
        raise VeloxLoadError(path, "its metadata describes a timestep-conditioned decoder (LTX-Video 0.9.x, "
                             "not LTX-2)", LTX2_VAE_EXPECTED)
    return config if isinstance(config, dict) else None


def _check_weights_fill(weights: Mapping[str, torch.Tensor], config: dict, path: Path) -> None:
    """The weights are exactly the tensors of the VideoVAE ``config`` builds (built on the meta device)."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in ltx_vae.VideoVAE(config=config).state_dict().items()}
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise VeloxLoadError(path, f"ComfyUI core's LTX VAE cannot be built for it ({error})",
                             LTX2_VAE_EXPECTED) from None
    missing = sorted(set(expected) - set(weights) - set(UNUSED_STATISTICS))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
    problems = [f"{label}: {', '.join(keys[:4])}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise VeloxLoadError(path, "its tensors do not fill ComfyUI core's LTX VAE (" + "; ".join(problems) + ")",
                             LTX2_VAE_EXPECTED)


def _with_unused_statistics(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keeps only the mean and std of the means; core's other statistics buffers (never read
    by encode or decode) are filled with zeros instead of staying uninitialized."""
    out = dict(weights)
    mean = out["per_channel_statistics.mean-of-means"]
    for key in UNUSED_STATISTICS:
        out.setdefault(key, torch.zeros_like(mean))
    return out

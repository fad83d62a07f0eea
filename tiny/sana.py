"""Tiny Sana transformers of the real architecture, deterministic random weights, every layout.

Variants (hidden 64-96, 2-3 blocks): 0.6B-style, 1.6B-style, Sana-1.5 (RMS q/k norm), 2K- and
4K-style sincos PE (interpolation 1 and 2), Sprint (q/k norm + guidance embedder). Weights are made
under the official names, with what real official checkpoints also carry (4-D 1x1 Mix-FFN convs,
the ``pos_embed`` buffer, zeros when PE is off, the null caption, Sprint's ``logvar_linear``).

Layouts written: official ``.pth`` ({"state_dict": ...}) and safetensors, diffusers single file
(current and legacy names), diffusers folder (single or sharded), ComfyUI-prefixed file and a local
Hugging Face cache tree. No diffusers import: the diffusers names come from ``loaders.sana_keys``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..loaders.sana_keys import diffusers_dimensions, official_to_diffusers
from ..models.sana import SanaConfig, SanaTransformer, sincos_pos_embed_2d

_TINY = dict(hidden_size=64, depth=2, num_heads=2, caption_channels=48)
_TINY_PE = dict(use_pe=True, sample_size=8, **_TINY)  # PE trained at 8x8 tokens, run at other sizes
TINY_SANA_CONFIGS: dict[str, SanaConfig] = {
    "sana_600m_style": SanaConfig(name="tiny_sana_600m_style", **_TINY),
    "sana_1600m_style": SanaConfig(name="tiny_sana_1600m_style", hidden_size=96, depth=3, num_heads=3,
                                   caption_channels=40),
    "sana15_qk_norm": SanaConfig(name="tiny_sana15_qk_norm", qk_norm=True, **_TINY),
    "sana_2k_pe": SanaConfig(name="tiny_sana_2k_pe", pe_interpolation=1.0, **_TINY_PE),
    "sana_4k_pe": SanaConfig(name="tiny_sana_4k_pe", pe_interpolation=2.0, flow_shift=6.0, **_TINY_PE),
    "sprint": SanaConfig(name="tiny_sprint", qk_norm=True, guidance_embeds=True, timestep_norm_scale=1000.0,
                         **_TINY),
}
NULL_CAPTION_TOKENS = 4
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SANA_PIPELINE_INDEX = {
    "_class_name": "SanaPipeline", "_diffusers_version": "0.42.1",
    "transformer": ["diffusers", "SanaTransformer2DModel"],
}


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------


def tiny_sana_state_dict(config: SanaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights under official names, as an official checkpoint holds them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SanaTransformer.from_config(config).state_dict().items()}
    state_dict = {key: random_sana_tensor(key, shapes[key], generator) for key in sorted(shapes)}
    for key in ("inverted_conv", "point_conv"):  # official 1x1 convs are 4-D
        for name in [k for k in state_dict if f"mlp.{key}.conv.weight" in k]:
            state_dict[name] = state_dict[name][:, :, None, None].contiguous()
    state_dict.update(_official_extras(config, generator))
    return state_dict


def random_sana_tensor(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    if key.endswith("norm.weight"):
        return 1.0 + 0.1 * values
    if key.endswith("scale_shift_table"):
        return values / shape[-1] ** 0.5
    if key.endswith(".bias"):
        return 0.1 * values
    fan_in = max(1, values[0].numel())
    return values / fan_in**0.5


def _official_extras(config: SanaConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Buffers and training-only tensors that real official checkpoints carry and loaders drop."""
    side = config.sample_size // config.patch_size
    pos_embed = torch.zeros(1, side * side, config.hidden_size)
    if config.use_pe:
        pos_embed = sincos_pos_embed_2d(config.hidden_size, side, side, side, config.pe_interpolation,
                                        torch.device("cpu"))
    extras = {
        "pos_embed": pos_embed.contiguous(),
        "y_embedder.y_embedding": torch.randn(NULL_CAPTION_TOKENS, config.caption_channels,
                                              generator=generator),
    }
    if config.guidance_embeds:
        extras["logvar_linear.weight"] = torch.randn(1, config.hidden_size, generator=generator)
        extras["logvar_linear.bias"] = torch.zeros(1)
    return extras


def diffusers_transformer_config(config: SanaConfig) -> dict:
    """The ``transformer/config.json`` diffusers writes for this config."""
    return {
        "_class_name": "SanaTransformer2DModel",
        "_diffusers_version": "0.42.1",
        **diffusers_dimensions(config),
        "dropout": 0.0,
        "attention_bias": False,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": config.pe_interpolation if config.use_pe else None,
        "guidance_embeds": config.guidance_embeds,
        "guidance_embeds_scale": config.guidance_embeds_scale,
        "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
        "timestep_scale": 1.0,
    }


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------


def write_official_pth(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Official release layout: ``torch.save({"state_dict": ...})``."""
    path = _parent_made(path)
    torch.save({"state_dict": dict(state_dict)}, path)
    return path


def write_safetensors(path: str | Path, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> Path:
    """One safetensors file; ``prefix`` e.g. ``model.diffusion_model.`` for ComfyUI's layout."""
    from safetensors.torch import save_file

    path = _parent_made(path)
    save_file({prefix + k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def write_diffusers_single_file(path: str | Path, state_dict: Mapping[str, torch.Tensor],
                                legacy: bool = False) -> Path:
    """diffusers ``SanaTransformer2DModel`` names in one file (``legacy``: adaln_single, pos_embed.proj)."""
    return write_safetensors(path, official_to_diffusers(state_dict, legacy=legacy))


def write_diffusers_folder(folder: str | Path, config: SanaConfig, state_dict: Mapping[str, torch.Tensor],
                           shards: int = 1) -> Path:
    """A diffusers pipeline folder: model_index.json + transformer/{config.json, weights}; with
    ``shards`` > 1 the weights are split and ``*.safetensors.index.json`` names them."""
    folder = Path(folder)
    component = folder / "transformer"
    component.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(SANA_PIPELINE_INDEX, indent=2))
    (component / "config.json").write_text(json.dumps(diffusers_transformer_config(config), indent=2))
    weights = official_to_diffusers(state_dict)
    if shards <= 1:
        write_safetensors(component / DIFFUSERS_WEIGHTS, weights)
    else:
        _write_shards(component, weights, shards)
    return folder


def _write_shards(component: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(weights)
    weight_map = {}
    for index in range(shards):
        shard_name = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[index::shards]}
        write_safetensors(component / shard_name, part)
        weight_map.update({k: shard_name for k in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (component / f"{DIFFUSERS_WEIGHTS}.index.json").write_text(json.dumps(index_json, indent=2))


def write_hf_cache_repo(cache_dir: str | Path, repo_id: str, config: SanaConfig,
                        state_dict: Mapping[str, torch.Tensor]) -> Path:
    """A diffusers repo as huggingface_hub caches it: blobs/, snapshots/<commit>/ (links to the
    blobs) and refs/main. Returns the snapshot folder."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    staging = repo_dir / "staging"
    write_diffusers_folder(staging, config, state_dict)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        _store_as_blob(file, repo_dir / "blobs", snapshot / file.relative_to(staging))
    shutil.rmtree(staging)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def _store_as_blob(file: Path, blobs: Path, target: Path) -> None:
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
    shutil.move(str(file), blob)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.relpath(blob, target.parent), target)
    except OSError:  # no symlinks (Windows without the privilege): a copy reads the same
        shutil.copyfile(blob, target)


def write_all_layouts(root: str | Path, config: SanaConfig, state_dict: Mapping[str, torch.Tensor],
                      repo_id: str = "Velox-Tiny/Sana_diffusers") -> dict[str, Path]:
    """Every layout under ``root``; returns layout name -> what a loader is given (file or folder)."""
    root = Path(root)
    return {
        "official_pth": write_official_pth(root / "official.pth", state_dict),
        "official_safetensors": write_safetensors(root / "official.safetensors", state_dict),
        "diffusers_file": write_diffusers_single_file(root / "diffusers.safetensors", state_dict),
        "diffusers_legacy_file": write_diffusers_single_file(root / "legacy.safetensors", state_dict,
                                                             legacy=True),
        "diffusers_folder": write_diffusers_folder(root / "pipeline", config, state_dict),
        "diffusers_sharded_folder": write_diffusers_folder(root / "sharded", config, state_dict, shards=2),
        "comfyui_file": write_safetensors(root / "comfyui.safetensors", state_dict,
                                          prefix="model.diffusion_model."),
        "hf_cache": write_hf_cache_repo(root / "hf_cache", repo_id, config, state_dict),
    }


def _parent_made(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


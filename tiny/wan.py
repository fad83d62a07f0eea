"""Tiny Wan transformers and a tiny Wan VAE of the real architecture, deterministic random weights.

Variants (dim 256 = two 128-channel heads, since ComfyUI reads heads as dim // 128; text_dim 4096
by default and the 1280-wide CLIP image projection as released): T2V, Wan 2.1 I2V (``img_emb`` + ``k_img``),
a Wan 2.2 A14B I2V expert (in_dim 36, no image embedding), VACE (vace_blocks at layers 0, 2).
Weights are made under the official names. Layouts written: official file, ComfyUI-prefixed file,
diffusers file, (sharded) diffusers folder, a sharded official folder, Wan 2.2 folders
(``transformer/`` + ``transformer_2/``, ``high_noise_model/`` + ``low_noise_model/``) and a local
Hugging Face cache tree. No diffusers import: the diffusers names come from ``loaders.wan_keys``.
Also a tiny umT5 (d_model 64, 2 layers, a locally trained SentencePiece tokenizer stored as
``spiece_model``) in ComfyUI's ``umt5_xxl_*`` layout; demo transformers set ``text_dim`` to its width.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..loaders.wan_keys import official_to_diffusers
from ..loaders.wan_vae_keys import OFFICIAL_VAE_MARKER

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CLIP_IMAGE_DIM = 1280
FREQ_DIM = 256
TEXT_DIM = 4096


@dataclass(frozen=True)
class TinyWanConfig:
    name: str
    dim: int = 256
    ffn_dim: int = 512
    num_layers: int = 2
    in_dim: int = 16
    out_dim: int = 16
    image_embedding: bool = False  # Wan 2.1 I2V: img_emb + k_img/v_img
    vace_layers: tuple[int, ...] = ()
    vace_in_dim: int = 96
    text_dim: int = TEXT_DIM  # the umT5 width it was trained with (the tiny umT5's d_model for demos)

    @property
    def num_heads(self) -> int:
        return self.dim // 128

    def diffusers_config(self) -> dict:
        """``config.json`` of the matching diffusers WanTransformer3DModel / WanVACETransformer3DModel."""
        config = {
            "_class_name": "WanVACETransformer3DModel" if self.vace_layers else "WanTransformer3DModel",
            "patch_size": [1, 2, 2], "num_attention_heads": self.num_heads, "attention_head_dim": 128,
            "in_channels": self.in_dim, "out_channels": self.out_dim, "text_dim": self.text_dim, "freq_dim": FREQ_DIM,
            "ffn_dim": self.ffn_dim, "num_layers": self.num_layers, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
            "image_dim": CLIP_IMAGE_DIM if self.image_embedding else None,
            "added_kv_proj_dim": self.dim if self.image_embedding else None, "rope_max_seq_len": 1024,
        }
        if self.vace_layers:
            config.update(vace_layers=list(self.vace_layers), vace_in_channels=self.vace_in_dim)
        return config


TINY_WAN_CONFIGS: dict[str, TinyWanConfig] = {
    "t2v": TinyWanConfig("tiny_wan_t2v"),
    "i2v": TinyWanConfig("tiny_wan21_i2v", in_dim=36, image_embedding=True),
    "wan22_i2v_expert": TinyWanConfig("tiny_wan22_i2v_expert", in_dim=36),
    "vace": TinyWanConfig("tiny_wan_vace", num_layers=4, vace_layers=(0, 2)),
}


# ----------------------------------------------------------------------------------------------
# transformer weights
# ----------------------------------------------------------------------------------------------


def _linear(name: str, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_features, in_features), f"{name}.bias": (out_features,)}


def _block_shapes(prefix: str, config: TinyWanConfig) -> dict[str, tuple[int, ...]]:
    dim = config.dim
    shapes = {f"{prefix}.modulation": (1, 6, dim), f"{prefix}.norm3.weight": (dim,), f"{prefix}.norm3.bias": (dim,)}
    for attn in ("self_attn", "cross_attn"):
        for proj in "qkvo":
            shapes.update(_linear(f"{prefix}.{attn}.{proj}", dim, dim))
        shapes.update({f"{prefix}.{attn}.norm_q.weight": (dim,), f"{prefix}.{attn}.norm_k.weight": (dim,)})
    if config.image_embedding:
        shapes.update(_linear(f"{prefix}.cross_attn.k_img", dim, dim))
        shapes.update(_linear(f"{prefix}.cross_attn.v_img", dim, dim))
        shapes[f"{prefix}.cross_attn.norm_k_img.weight"] = (dim,)
    shapes.update(_linear(f"{prefix}.ffn.0", config.ffn_dim, dim))
    shapes.update(_linear(f"{prefix}.ffn.2", dim, config.ffn_dim))
    return shapes


def wan_official_shapes(config: TinyWanConfig) -> dict[str, tuple[int, ...]]:
    """Every official key of this architecture and its shape (the released module tree)."""
    dim = config.dim
    shapes = {"patch_embedding.weight": (dim, config.in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
              "head.modulation": (1, 2, dim)}
    shapes.update(_linear("text_embedding.0", dim, config.text_dim))
    shapes.update(_linear("text_embedding.2", dim, dim))
    shapes.update(_linear("time_embedding.0", dim, FREQ_DIM))
    shapes.update(_linear("time_embedding.2", dim, dim))
    shapes.update(_linear("time_projection.1", 6 * dim, dim))
    shapes.update(_linear("head.head", config.out_dim * 4, dim))
    if config.image_embedding:
        shapes.update({"img_emb.proj.0.weight": (CLIP_IMAGE_DIM,), "img_emb.proj.0.bias": (CLIP_IMAGE_DIM,),
                       "img_emb.proj.4.weight": (dim,), "img_emb.proj.4.bias": (dim,)})
        shapes.update(_linear("img_emb.proj.1", CLIP_IMAGE_DIM, CLIP_IMAGE_DIM))
        shapes.update(_linear("img_emb.proj.3", dim, CLIP_IMAGE_DIM))
    for i in range(config.num_layers):
        shapes.update(_block_shapes(f"blocks.{i}", config))
    if config.vace_layers:
        shapes.update({"vace_patch_embedding.weight": (dim, config.vace_in_dim, 1, 2, 2),
                       "vace_patch_embedding.bias": (dim,)})
        for j in range(len(config.vace_layers)):
            shapes.update(_block_shapes(f"vace_blocks.{j}", config))
            shapes.update(_linear(f"vace_blocks.{j}.after_proj", dim, dim))
        shapes.update(_linear("vace_blocks.0.before_proj", dim, dim))
    return shapes


def tiny_wan_state_dict(config: TinyWanConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights under official names."""
    generator = torch.Generator().manual_seed(seed)
    shapes = wan_official_shapes(config)
    return {key: _random_tensor(key, shapes[key], generator) for key in sorted(shapes)}


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    if key.endswith(("norm_q.weight", "norm_k.weight", "norm_k_img.weight", "norm3.weight", "gamma")) or (
        key.startswith("img_emb.proj.") and key.split(".")[2] in ("0", "4") and key.endswith("weight")
    ):
        return 1.0 + 0.1 * values
    if key.endswith("modulation"):
        return values / shape[-1] ** 0.5
    if key.endswith(".bias"):
        return 0.1 * values
    fan_in = max(1, values[0].numel())
    return values / fan_in**0.5


# ----------------------------------------------------------------------------------------------
# transformer layouts
# ----------------------------------------------------------------------------------------------


def _save(state_dict: Mapping[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def write_official_file(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    return _save(state_dict, Path(path))


def write_comfyui_file(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Comfy-Org's repackaged layout: official names under ``model.diffusion_model.``."""
    return _save({"model.diffusion_model." + k: v for k, v in state_dict.items()}, Path(path))


def write_diffusers_file(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    return _save(official_to_diffusers(state_dict), Path(path))


def write_diffusers_component(
    state_dict: Mapping[str, torch.Tensor], directory: str | Path, config: TinyWanConfig, shards: int = 1
) -> Path:
    """A diffusers component folder: config.json + one file, or ``shards`` files and an index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.diffusers_config(), indent=1))
    diffusers = official_to_diffusers(state_dict)
    if shards <= 1:
        _save(diffusers, directory / DIFFUSERS_WEIGHTS)
    else:
        _save_shards(diffusers, directory, shards)
    return directory


def _save_shards(state_dict: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    keys = sorted(state_dict)
    weight_map = {}
    for n in range(shards):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[n::shards]
        _save({k: state_dict[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / (DIFFUSERS_WEIGHTS + ".index.json")).write_text(json.dumps(index, indent=1))


def write_diffusers_folder(
    state_dict: Mapping[str, torch.Tensor], folder: str | Path, config: TinyWanConfig, shards: int = 1
) -> Path:
    """A diffusers pipeline folder with ``transformer/`` (sharded when shards > 1)."""
    folder = Path(folder)
    write_diffusers_component(state_dict, folder / "transformer", config, shards)
    _write_model_index(folder, ["transformer"])
    return folder


def write_wan22_folder(
    high_noise: Mapping[str, torch.Tensor], low_noise: Mapping[str, torch.Tensor], folder: str | Path,
    high_config: TinyWanConfig, low_config: TinyWanConfig | None = None, shards: int = 1,
) -> Path:
    """Wan 2.2 A14B diffusers layout: ``transformer/`` (high noise) and ``transformer_2/`` (low noise)."""
    folder = Path(folder)
    write_diffusers_component(high_noise, folder / "transformer", high_config, shards)
    write_diffusers_component(low_noise, folder / "transformer_2", low_config or high_config, shards)
    _write_model_index(folder, ["transformer", "transformer_2"], boundary_ratio=0.9)
    return folder


def write_official_folder(
    state_dict: Mapping[str, torch.Tensor], folder: str | Path, config: TinyWanConfig, shards: int = 2
) -> Path:
    """An official Wan-AI repository folder: official names in shards + index, a ``WanModel`` config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": config.dim,
                                                    "in_dim": config.in_dim, "num_layers": config.num_layers}))
    _save_shards(dict(state_dict), folder, shards)
    return folder


def write_official_wan22_folder(
    high_noise: Mapping[str, torch.Tensor], low_noise: Mapping[str, torch.Tensor], folder: str | Path,
    config: TinyWanConfig, shards: int = 2,
) -> Path:
    """Wan-AI's Wan 2.2 A14B layout: ``high_noise_model/`` and ``low_noise_model/``, official names."""
    folder = Path(folder)
    write_official_folder(high_noise, folder / "high_noise_model", config, shards)
    write_official_folder(low_noise, folder / "low_noise_model", config, shards)
    return folder


def _write_model_index(folder: Path, components: list[str], **extra) -> None:
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", **extra}
    index.update({name: ["diffusers", "WanTransformer3DModel"] for name in components})
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))


def write_hf_cache_repo(source_folder: str | Path, cache_dir: str | Path, repo_id: str) -> Path:
    """Lay ``source_folder`` out as huggingface_hub does (blobs + snapshot symlinks + refs/main)."""
    source_folder, cache_dir = Path(source_folder), Path(cache_dir)
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for file in sorted(p for p in source_folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source_folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


# ----------------------------------------------------------------------------------------------
# the Wan 2.1 VAE (num_res_blocks = 2 as released: diffusers' converter assumes that structure)
# ----------------------------------------------------------------------------------------------

TINY_VAE_DIM = 8  # base width; ComfyUI reads it from decoder.head.0.gamma, the rest is as released
VAE_Z_DIM = 16


def tiny_wan_vae_state_dict(dim: int = TINY_VAE_DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-name weights of a Wan 2.1 VAE of base width ``dim`` (shapes from ComfyUI's WanVAE,
    built on the meta device, so this one needs the ComfyUI host importable)."""
    import comfy.ldm.wan.vae

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.ldm.wan.vae.WanVAE(
            dim=dim, z_dim=VAE_Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state_dict = {key: _random_tensor(key, tuple(shapes[key]), generator) for key in sorted(shapes)}
    assert OFFICIAL_VAE_MARKER in state_dict
    return state_dict


# ----------------------------------------------------------------------------------------------
# a tiny umT5 encoder (ComfyUI's umt5_xxl file layout: transformers' T5 names + ``spiece_model``)
# ----------------------------------------------------------------------------------------------

TINY_UMT5 = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 2, "d_kv": 32}
UMT5_BUCKETS = 32
TINY_UMT5_VOCAB = 512  # upper bound; the trained tokenizer decides the final size


# Wan is prompted in English and Chinese; its official negative prompt is Chinese (shared_config.py)
WAN_NEGATIVE_PROMPT_ZH = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
                          "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
                          "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
CHINESE_PROMPTS = (WAN_NEGATIVE_PROMPT_ZH, "一只红色的狐狸在雪地里奔跑，清晨的阳光", "雨夜的赛博朋克街道，霓虹灯倒映在水面上")


def train_tiny_umt5_tokenizer() -> bytes:
    """A serialized SentencePiece unigram model with umT5's special ids (<pad>=0, </s>=1, <unk>=2)."""
    import io

    import sentencepiece as spm

    from .gemma import PROMPTS

    model = io.BytesIO()
    corpus = list(PROMPTS) + [p.lower() for p in PROMPTS] + list(CHINESE_PROMPTS)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model,
        model_type="unigram", vocab_size=TINY_UMT5_VOCAB, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        byte_fallback=True, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def umt5_shapes(vocab_size: int, d_model: int, d_ff: int, num_layers: int, num_heads: int,
                d_kv: int) -> dict[str, tuple[int, ...]]:
    """Every key of a umT5 encoder (each layer has its own relative attention bias) and its shape."""
    inner = num_heads * d_kv
    shapes = {"shared.weight": (vocab_size, d_model), "encoder.final_layer_norm.weight": (d_model,)}
    for i in range(num_layers):
        p = f"encoder.block.{i}.layer."
        shapes.update({p + f"0.SelfAttention.{w}.weight": (inner, d_model) for w in "qkv"})
        shapes[p + "0.SelfAttention.o.weight"] = (d_model, inner)
        shapes[p + "0.SelfAttention.relative_attention_bias.weight"] = (UMT5_BUCKETS, num_heads)
        shapes[p + "0.layer_norm.weight"] = (d_model,)
        shapes.update({p + f"1.DenseReluDense.{w}.weight": (d_ff, d_model) for w in ("wi_0", "wi_1")})
        shapes[p + "1.DenseReluDense.wo.weight"] = (d_model, d_ff)
        shapes[p + "1.layer_norm.weight"] = (d_model,)
    return shapes


def tiny_umt5_state_dict(seed: int = 0, spiece_model: bytes | None = None) -> dict[str, torch.Tensor]:
    """Deterministic random tiny umT5 weights plus the tokenizer as the uint8 tensor ``spiece_model``."""
    import sentencepiece as spm

    spiece_model = spiece_model or train_tiny_umt5_tokenizer()
    vocab_size = spm.SentencePieceProcessor(model_proto=spiece_model).get_piece_size()
    shapes = umt5_shapes(vocab_size, **TINY_UMT5)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key in sorted(shapes):
        values = torch.randn(shapes[key], generator=generator)
        if key.endswith("layer_norm.weight"):
            values = 1.0 + 0.1 * values
        elif not key.endswith(("shared.weight", "relative_attention_bias.weight")):
            values = values / shapes[key][1] ** 0.5
        state_dict[key] = values
    state_dict["spiece_model"] = torch.frombuffer(bytearray(spiece_model), dtype=torch.uint8)
    return state_dict


def write_tiny_umt5_file(path: str | Path, seed: int = 0) -> Path:
    """ComfyUI's ``umt5_xxl_*.safetensors`` layout at tiny size."""
    return _save(tiny_umt5_state_dict(seed), Path(path))

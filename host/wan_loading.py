"""Files and folders -> Wan's MODEL, VAE and umT5 CLIP, built by ComfyUI core's own machinery.

Core already has the Wan backbone (``comfy.ldm.wan.model.WanModel`` / ``VaceWanModel``), the VAE
and umT5; what it lacks is the layouts. So every loader here maps keys onto the official names
(``loaders.wan_keys`` / ``wan_vae_keys``) and hands the state dict to core:
``comfy.sd.load_diffusion_model_state_dict`` (detection, dtype choice, ``custom_operations`` for
quantized ops later), ``comfy.sd.VAE(sd=...)`` and ``comfy.sd.load_text_encoder_state_dicts``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.text_encoders.sd3_clip
import comfy.text_encoders.wan
import comfy.utils
import torch

from ..errors import VeloxLoadError
from ..loaders.checkpoint_files import (
    load_state_dict,
    read_component,
    read_safetensors_header,
    resolve_diffusers_component,
    resolve_hf_cache_repo,
)
from ..loaders.wan_detect import sniff_wan
from ..loaders.wan_vae_keys import canonicalize_wan_vae_state_dict
from .gguf_text_weights import (
    clip_devices,
    encoder_dtype,
    gguf_text_operations,
    load_packed,
    parameter_count,
    read_text_encoder_gguf,
    spiece_tensor,
)
from .model_paths import HF_CACHE_PREFIX
from .quant_loading import is_gguf, read_weights
from .wan_model import build_wan_from_weights, build_wan_model

# Wan 2.2 A14B expert folders, (high noise = sigma above the boundary, low noise): diffusers, official
EXPERT_FOLDER_PAIRS = (("transformer", "transformer_2"), ("high_noise_model", "low_noise_model"))
EXPERTS = ("high_noise", "low_noise")
EXPERT_PAIR_EXPECTED = ("a Wan 2.2 A14B folder with transformer/ + transformer_2/ (diffusers) or "
                        "high_noise_model/ + low_noise_model/ (official)")
# core's comfy/text_encoders/umt5_config_xxl.json, the part the shapes decide
UMT5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 256384}
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
    model_options: dict | None = None, quantization: str = "none", quant_compute: str = "dequant",
) -> comfy.model_patcher.ModelPatcher:
    """A Wan transformer of any layout as a ComfyUI MODEL on core's WanModel / VaceWanModel.

    source: a file (official, ComfyUI-prefixed, diffusers), a diffusers or official folder (sharded
    too), a Wan 2.2 folder (``expert`` "high_noise" picks ``transformer/`` / ``high_noise_model/``,
    "low_noise" ``transformer_2/`` / ``low_noise_model/``), or ``"hf-cache: Org/Name"``.
    model_options go to core. GGUF, scaled-fp8 and comfy_quant files, and ``quantization`` other than
    "none" (fp8_e4m3 / int8, computed by ``quant_compute`` dequant / lowp), load on ``host/quant_ops.py``.
    """
    path = resolve_source(source)
    pair = _expert_folders(path)
    component = pair[EXPERTS.index(expert)] if pair else "transformer"
    weights, config = read_weights(path, component)
    return build_wan_from_weights(weights, path, dtype, quantization, quant_compute, diffusers_config=config,
                                  model_options=model_options)


def load_wan_experts(
    source: str | Path, dtype: torch.dtype | None = None, model_options: dict | None = None
) -> tuple[comfy.model_patcher.ModelPatcher, comfy.model_patcher.ModelPatcher]:
    """Both experts of a Wan 2.2 A14B folder (diffusers or official): (high noise, low noise)."""
    folder = resolve_source(source)
    pair = _expert_folders(folder)
    if pair is None:
        raise VeloxLoadError(folder, "holds one model, not a Wan 2.2 expert pair (no transformer_2/ or "
                             "low_noise_model/ folder)", EXPERT_PAIR_EXPECTED)
    (high_sd, high_config), (low_sd, low_config) = [read_component(folder, component) for component in pair]
    (high_variant, high_sd), (low_variant, low_sd) = [
        sniff_wan(weights, folder / component) for weights, component in zip((high_sd, low_sd), pair)]
    if not high_variant.same_architecture(low_variant):
        raise VeloxLoadError(folder, f"the two experts differ: {pair[0]}/ is {high_variant.describe()}, "
                             f"{pair[1]}/ is {low_variant.describe()}",
                             "two experts of one Wan 2.2 model (same size and input channels)")
    return (build_wan_model(high_sd, high_variant, folder / pair[0], dtype, model_options, high_config),
            build_wan_model(low_sd, low_variant, folder / pair[1], dtype, model_options, low_config))


def _expert_folders(path: Path) -> tuple[str, str] | None:
    """The (high, low) expert subfolders of a Wan 2.2 folder; None for anything else."""
    if not path.is_dir():
        return None
    return next((pair for pair in EXPERT_FOLDER_PAIRS if all((path / name).is_dir() for name in pair)), None)


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
    """umT5 as Wan's CLIP: ComfyUI's single file (umT5-XXL goes through core's ``load_clip``, so
    scaled-fp8 and quantization metadata keep working), or a diffusers ``text_encoder/`` + ``tokenizer/``
    folder. The size comes from the weights: anything but XXL (a tiny demo umT5) is built by core's
    Wan text encoder with its config overridden through ``model_options["umt5xxl_model_config"]``.
    A ``.gguf`` (ours or city96's / llama.cpp's) loads through ``load_umt5_gguf``."""
    path = resolve_source(source)
    cpu_device = torch.device("cpu")
    options = {"load_device": cpu_device, "offload_device": cpu_device, "initial_device": cpu_device} if cpu else {}
    if is_gguf(path):  # ours or llama.cpp's; Linear weights stay packed
        return load_umt5_gguf(path, options)
    try:
        config = umt5_config(_umt5_shapes(path), path)
        if config == UMT5_XXL and not path.is_dir():
            return comfy.sd.load_clip([str(path)], clip_type=comfy.sd.CLIPType.WAN, model_options=options)
        state_dict = umt5_state_dict(path)
        if config == UMT5_XXL:
            return comfy.sd.load_text_encoder_state_dicts([state_dict], clip_type=comfy.sd.CLIPType.WAN,
                                                          model_options=options)
        return _build_umt5(state_dict, config, options, path)
    except (RuntimeError, KeyError, ValueError) as error:
        if isinstance(error, VeloxLoadError):
            raise
        raise VeloxLoadError(path, f"ComfyUI could not load it as umT5 ({str(error)[:200]})", UMT5_EXPECTED) from None


def load_umt5_gguf(path: str | Path, options: Mapping | None = None, dtype: torch.dtype | None = None):
    """A umT5 GGUF (ours or llama.cpp's / city96's) as Wan's CLIP: core's Wan text encoder and
    tokenizer, the config fields read from the shapes (``umt5_config``)."""
    gguf = read_text_encoder_gguf(path, "umt5", UMT5_EXPECTED)
    weights = dict(gguf.weights)
    weights.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    config = umt5_config(gguf.shapes(), gguf.path)
    dtype = encoder_dtype(weights, "shared.weight", dtype)
    target = SimpleNamespace(clip=comfy.text_encoders.wan.te(dtype_t5=dtype),
                             tokenizer=comfy.text_encoders.wan.WanT5Tokenizer, params={})
    model_options = {**clip_devices(options or {}), "dtype": dtype, "custom_operations": gguf_text_operations(),
                     "umt5xxl_model_config": dict(config, num_decoder_layers=config["num_layers"])}
    clip = comfy.sd.CLIP(target, parameters=parameter_count(weights), model_options=model_options,
                         tokenizer_data={"spiece_model": spiece_tensor(gguf.spiece_model)})
    _, unexpected = load_packed(clip, weights, gguf.path, f"umT5 {json.dumps(config)}")
    if unexpected:
        logging.warning("Velox: umT5 %s: unexpected tensors %s", gguf.path, list(unexpected)[:4])
    return clip



def _umt5_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a umT5 file or folder, read from the safetensors headers where possible."""
    files = [path]
    if path.is_dir():
        files = list(resolve_diffusers_component(path, "text_encoder").weight_files)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if str(file).endswith(".safetensors"):  # the checked header: a damaged file is refused by name
            header = read_safetensors_header(file)
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
        else:
            shapes.update({k: tuple(v.shape) for k, v in load_state_dict(file).items()})
    return shapes


def umt5_config(shapes: Mapping[str, tuple[int, ...]], path: str | Path | None = None) -> dict[str, int]:
    """The size fields of core's umT5 config (d_model, d_ff, layers, heads, d_kv, vocab) from the shapes."""
    needed = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    absent = [key for key in needed if key not in shapes]
    if absent:
        raise VeloxLoadError(path, f"is not a umT5 encoder (no {absent[0]}; first keys: {list(shapes)[:4]})",
                             UMT5_EXPECTED)
    vocab_size, d_model = shapes["shared.weight"]
    num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][1]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    layers = {k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}
    return {"d_model": int(d_model), "d_ff": int(shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]),
            "num_layers": len(layers), "num_heads": int(num_heads), "d_kv": int(inner // num_heads),
            "vocab_size": int(vocab_size)}


def _build_umt5(state_dict: dict[str, torch.Tensor], config: dict[str, int], options: dict, path: Path):
    """Core's Wan text encoder + tokenizer (what ``load_text_encoder_state_dicts`` picks for umT5-XXL)
    with the config fields the weights decide."""
    spiece = state_dict.pop("spiece_model", None)
    if spiece is None:
        raise VeloxLoadError(path, "holds no tokenizer (no spiece_model tensor)", UMT5_EXPECTED)

    class Target:
        clip = comfy.text_encoders.wan.te(**comfy.text_encoders.sd3_clip.t5_xxl_detect(state_dict))
        tokenizer = comfy.text_encoders.wan.WanT5Tokenizer
        params: dict = {}

    model_options = {**options, "umt5xxl_model_config": dict(config, num_decoder_layers=config["num_layers"])}
    clip = comfy.sd.CLIP(Target, parameters=comfy.utils.calculate_parameters(state_dict),
                         tokenizer_data={"spiece_model": spiece}, model_options=model_options)
    missing, unexpected = clip.load_sd(state_dict)
    if missing:
        raise VeloxLoadError(path, f"weights do not fill umT5 {json.dumps(config)}: missing {list(missing)[:4]}",
                             UMT5_EXPECTED)
    if unexpected:
        logging.warning("Velox: umT5 %s: unexpected tensors %s", path, list(unexpected)[:4])
    return clip


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

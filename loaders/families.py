"""The model families Velox knows: one frozen ``Family`` per family, in one list (core's
``supported_models.py`` pattern). Every family-specific table reads from here: detection markers,
the foreign-family refusals, the diffusers class, GGUF architectures and auto detection, the
converter's and the quantized loaders' keep-in-float patterns, shared activation groups, LoRA
module rules and display names.

Patterns are regular expressions over canonical names (``re.search``); markers are key suffixes
(``str.endswith``). The family-specific code (detector, canonicalizer, demo checkpoint writer) is
named as ``"module:function"`` under the package and imported on first use, so this module stays
at the bottom of ``loaders/`` and the family modules may import it.

To add a family: its own files (the model in ``models/``, key map and detector in ``loaders/``, the
ComfyUI model config in ``host/``, tiny weights in ``tiny/``), then one ``Family(...)`` here in
``FAMILIES`` (markers, signs, noun, keep_float / keep_f32, shared_input, lora_rules, gguf_architecture,
nvfp4, sniff / canonicalize / demo; ``refines`` when its files also carry an older family's markers,
``lora_names`` when its LoRAs come in diffusers names), its nodes in the node list and its presets
in ``sampling/presets.py``. Detection, refusals, GGUF detection and conversion, quantized loading,
shared activations, LoRA detection and key dialects, the loaders' folder lists and the demo models
(``scripts/make_demo_models.py``) pick the entry up; ``host/model_build.build_patcher`` builds it.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NoReturn

from ..errors import VeloxLoadError

PACKAGE = __name__.rpartition(".loaders.")[0]


@dataclass(frozen=True)
class Family:
    """One model family: identity, detection, layouts, quantization and LoRA rules.

    name: registry key (``sana``); display_name: what messages call it; kind: ``diffusion``,
    ``controlnet`` or ``text_encoder``; noun: what one of its files is called in messages ("a Sana
    transformer"); diffusers_class: the diffusers ``_class_name`` of its
    config.json; markers: key suffixes that only this family's files have (after the ComfyUI prefix
    is stripped); signs: (key fragment, what a file holding it is), checked by the other families'
    loaders to name a wrong file; loader_node: the node that loads it (named in refusals);
    gguf_architecture / gguf_aliases: ``general.architecture`` written / also read; llama_cpp_marker:
    a name only the llama.cpp layout of a text encoder has; keep_float: tensors and layers that never
    get a block type or a quantized storage; keep_f32: of those, the ones kept in F32; shared_input:
    sibling layers that quantize one input activation once (``host/shared_activation.py``);
    lora_rules: module-name rules of its LoRAs (``loaders/lora_detect.py``); nvfp4: the NVFP4
    converter makes files for it; gguf_block_groups: its canonicalizer fuses tensors of one block
    (diffusers' to_q / to_k / to_v -> qkv), so the converters read a block at a time; refines: the
    family whose markers its files also carry (SANA-Video's blocks hold Sana's Mix-FFN): detection
    and refusals check it first, the refined family's ``marks`` is False on its files and a LoRA of
    the refined family fits its models (``lora_fits``); sniff / canonicalize / demo / lora_names:
    ``"module:function"`` under the package (raw state dict -> (detail, canonical state dict); raw ->
    canonical; models dir -> None, writing its demo checkpoints; official module + weight shape ->
    [(diffusers module, row range or None)], the LoRA spellings ``loaders/lora_keys.py`` accepts).
    """

    name: str
    display_name: str
    noun: str
    kind: str = "diffusion"
    diffusers_class: str | None = None
    markers: tuple[str, ...] = ()
    signs: tuple[tuple[str, str], ...] = ()
    loader_node: str | None = None
    gguf_architecture: str | None = None
    gguf_aliases: tuple[str, ...] = ()
    llama_cpp_marker: str | None = None
    keep_float: tuple[str, ...] = ()
    keep_f32: tuple[str, ...] = ()
    shared_input: tuple[str, ...] = ()
    lora_rules: tuple[str, ...] = ()
    nvfp4: bool = False
    gguf_block_groups: bool = False
    refines: str | None = None
    sniff: str | None = None
    canonicalize: str | None = None
    demo: str | None = None
    lora_names: str | None = None

    def marks(self, keys: Iterable[str]) -> bool:
        """Whether any key ends in one of the family's markers, and no family that refines it marks
        the keys too (a SANA-Video file is not a Sana one, though it carries Sana's markers)."""
        keys = list(keys)
        if not self.markers or not any(key.endswith(self.markers) for key in keys):
            return False
        return not any(f.refines == self.name and f.marks(keys) for f in FAMILIES.values())

    def check(self, keys: Iterable[str], path: str | Path | None, expected: str) -> None:
        """The family step of a load: pass when the keys are this family's (``marks``), else raise
        VeloxLoadError naming what the checkpoint looks like (``refuse_foreign``)."""
        keys = list(keys)
        if not self.marks(keys):
            refuse_foreign(keys, self, path, expected)

    def keeps_float(self, name: str) -> bool:
        return self._keep_float is not None and self._keep_float.search(name) is not None

    def keeps_f32(self, name: str) -> bool:
        return self._keep_f32 is not None and self._keep_f32.search(name) is not None

    @cached_property
    def _keep_float(self) -> re.Pattern | None:
        return _union(self.keep_float)

    @cached_property
    def _keep_f32(self) -> re.Pattern | None:
        return _union(self.keep_f32)

    def function(self, field_name: str) -> Callable:
        """The ``"module:function"`` of ``sniff``, ``canonicalize``, ``demo`` or ``lora_names``, imported."""
        reference = getattr(self, field_name)
        if reference is None:
            raise LookupError(f"the {self.display_name} family has no {field_name} function")
        module, _, function = reference.partition(":")
        return getattr(importlib.import_module(f"{PACKAGE}.{module}"), function)


def _union(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


# Models that are no Velox family, named when one is handed to a Velox loader (checked after the
# families' own signs, in order).
OTHER_MODELS: tuple[tuple[str, str], ...] = (
    ("double_blocks.", "a Flux-style transformer"),
    ("joint_blocks.", "an SD3 MMDiT"),
    ("decoder.middle.0.residual.0.gamma", "a Wan VAE (load it with the Wan VAE loader)"),
    ("decoder.mid_block.resnets.0.norm1.gamma", "a Wan VAE in diffusers layout (load it with the Wan VAE loader)"),
    ("down_blocks.0.resnets.", "a diffusers UNet or VAE (Stable Diffusion family)"),
    ("encoder.down_blocks.", "a VAE"),
    ("encoder.stages.", "a DC-AE autoencoder"),
    ("transformer_blocks.0.ff.net.", "a diffusers transformer of another family (PixArt-like)"),
)

SANA = Family(
    name="sana",
    display_name="Sana",
    noun="a Sana transformer",
    diffusers_class="SanaTransformer2DModel",
    markers=("mlp.inverted_conv.conv.weight", "ff.conv_inverted.weight"),
    signs=(("mlp.inverted_conv.conv.weight", "a Sana transformer"),
           ("ff.conv_inverted.weight", "a Sana transformer in diffusers layout")),
    loader_node="Load Sana Model (Velox)",
    gguf_architecture="sana",
    # The union of the converter's table (scale_shift_table) and the quantized loader's
    # (logvar_linear, Sprint's training-only head); scale_shift_table is added to activations.
    keep_float=(r"^x_embedder\.", r"^t_embedder\.", r"^cfg_embedder\.", r"^t_block\.", r"^y_embedder\.",
                r"^final_layer\.", r"^logvar_linear", r"depth_conv", r"norm", r"scale_shift_table"),
    keep_f32=(r"scale_shift_table",),
    lora_rules=(
        r"(^|_)attn_(qkv|proj)$", r"(^|_)cross_attn_(q_linear|kv_linear|proj)$",
        r"(^|_)mlp_(inverted_conv|depth_conv|point_conv)", r"^transformer_blocks_\d+_(attn[12]_|ff_conv_)",
        r"^(t_block|y_embedder|x_embedder|t_embedder|cfg_embedder|final_layer|attention_y_norm)",
        r"^(caption_projection|time_embed_(emb|linear|timestep|guidance)|adaln_single|patch_embed)",
    ),
    nvfp4=True,
    gguf_block_groups=True,
    sniff="loaders.sana_detect:sniff_sana",
    canonicalize="loaders.sana_keys:canonicalize_sana_state_dict",
)

SANA_CONTROLNET = Family(
    name="sana_controlnet",
    display_name="Sana ControlNet",
    noun="a Sana ControlNet",
    kind="controlnet",
    diffusers_class="SanaControlNetModel",
    markers=("controlnet.0.before_proj.weight",),  # official; diffusers: input_block.weight + Sana's markers
    loader_node="Load Sana ControlNet (Velox)",
    sniff="loaders.sana_controlnet_keys:sniff_sana_controlnet",
    canonicalize="loaders.sana_controlnet_keys:canonicalize_sana_controlnet",
)

WAN = Family(
    name="wan",
    display_name="Wan",
    noun="a Wan transformer",
    diffusers_class="WanTransformer3DModel",
    markers=("head.modulation", "condition_embedder.time_proj.weight", "vace_patch_embedding.weight",
             "vace_blocks.0.after_proj.weight", "vace_blocks.0.proj_out.weight", "blocks.0.self_attn.q.weight"),
    signs=(("head.modulation", "a Wan transformer"),
           ("patch_embedding.weight", "a Wan transformer"),
           ("self_attn.q.weight", "a Wan transformer"),
           ("condition_embedder.time_proj.weight", "a Wan transformer in diffusers layout")),
    loader_node="Load Wan Model (Velox)",
    gguf_architecture="wan",
    # city96's lcpp.patch list for Wan
    keep_float=(r"^patch_embedding", r"^vace_patch_embedding", r"^text_embedding\.", r"^time_embedding\.",
                r"^time_projection\.", r"^img_emb\.", r"^head\.", r"modulation", r"norm"),
    keep_f32=(r"modulation",),
    # core's WanSelfAttention / WanT2VCrossAttention / WanI2VCrossAttention
    shared_input=(r"self_attn\.[qkv]$", r"cross_attn\.[kv]$", r"cross_attn\.[kv]_img$"),
    lora_rules=(
        r"(^|_)self_attn_[qkvo]$", r"(^|_)cross_attn_([qkvo]|k_img|v_img)$", r"^(vace_)?blocks_\d+_ffn_",
        r"^(vace_)?blocks_\d+_attn[12]_(to_|add_|norm_)", r"^(time_projection|text_embedding|time_embedding|head_head)",
        r"^condition_embedder_", r"^(vace_blocks|vace_patch_embedding|img_emb)",
    ),
    nvfp4=True,
    sniff="loaders.wan_detect:sniff_wan",
    canonicalize="loaders.wan_keys:canonicalize_wan_state_dict",
)

VIDEOCRAFTER = Family(
    name="videocrafter",
    display_name="VideoCrafter / DynamiCrafter",
    noun="a VideoCrafter / DynamiCrafter UNet",
    markers=("input_blocks.0.0.weight",),
    signs=(("input_blocks.", "a UNet (Stable Diffusion / VideoCrafter / DynamiCrafter)"),),
    loader_node="Load VideoCrafter / DynamiCrafter (Velox)",
    gguf_architecture="videocrafter",
    # Over a release checkpoint's names (the VAE, text and image encoders stay float under their
    # prefixes) and over a bare UNet's (city96's layout, or the quantized loader's layer names).
    keep_float=(r"^(first_stage_model|cond_stage_model|embedder|image_proj_model|model_ema)\.",
                r"time_embed\.",
                r"fps_embedding\.", r"emb_layers\.", r"norm", r"input_blocks\.0\.0\.",
                r"^(model\.)?(diffusion_model\.)?out\.", r"embeddings_table"),
    # models/unet3d_attention.py CrossAttention: q, k, v on x (self-attention); k, v on the text
    # slice and k_ip, v_ip on the image slice of the context (cross-attention)
    shared_input=(r"attn[12]\.to_[qkv]$", r"attn2\.to_[kv]_ip$"),
    lora_rules=(
        r"^(input_blocks|output_blocks|middle_block|out_[02])_", r"temopral_conv",
        r"^(fps_embedding|framestride_embed|image_proj_model|time_embed_[02])",
    ),
    sniff="loaders.videocrafter_detect:sniff_videocrafter",
)

SANA_VIDEO = Family(
    name="sana_video",
    display_name="SANA-Video",
    noun="a SANA-Video transformer",
    diffusers_class="SanaVideoTransformer3DModel",
    refines="sana",  # its blocks carry Sana's Mix-FFN (mlp.inverted_conv / ff.conv_inverted) too
    markers=("mlp.t_conv.weight", "ff.conv_temp.weight"),  # GLUMBConvTemp's temporal conv
    signs=(("mlp.t_conv.weight", "a SANA-Video transformer"),
           ("ff.conv_temp.weight", "a SANA-Video transformer in diffusers layout")),
    loader_node="Load SANA-Video Model (Velox)",
    gguf_architecture="sana_video",
    # Sana's list (models/sana_video.py reuses its embedders, norms and final layer) and the temporal
    # conv; the 3-D patch embedding is x_embedder.proj
    keep_float=(r"^x_embedder\.", r"^t_embedder\.", r"^t_block\.", r"^y_embedder\.", r"^final_layer\.",
                r"^logvar_linear", r"depth_conv", r"\.t_conv\b", r"norm", r"scale_shift_table"),
    keep_f32=(r"scale_shift_table",),
    # q/k/v are one fused Linear (attn.qkv) and the cross-attention's k/v one kv_linear, as in Sana:
    # no sibling layers read one input
    lora_rules=(*SANA.lora_rules, r"(^|_)mlp_t_conv", r"^(caption_norm|proj_out)$"),
    gguf_block_groups=True,
    sniff="loaders.sana_video_keys:sniff_sana_video",
    canonicalize="loaders.sana_video_keys:canonicalize_sana_video_state_dict",
    demo="tiny.sana_video:write_demo_models",
    lora_names="loaders.sana_video_keys:lora_diffusers_names",
)

UMT5 = Family(
    name="umt5",
    display_name="umT5",
    noun="a umT5 / T5 encoder (Wan's text encoder)",
    kind="text_encoder",
    markers=("encoder.block.0.layer.0.SelfAttention.q.weight",),
    signs=(("encoder.block.0.layer.0.SelfAttention", "a T5 / umT5 text encoder"),),
    loader_node="Load Wan Text Encoder (umT5-XXL, Velox)",
    gguf_architecture="t5encoder",
    gguf_aliases=("t5",),
    llama_cpp_marker="enc.blk.0.attn_q.weight",
    keep_float=(r"^shared\.", r"embed_tokens", r"relative_attention_bias", r"layer_norm"),
)

GEMMA2 = Family(
    name="gemma2",
    display_name="Gemma-2",
    noun="Gemma-2 (Sana's text encoder)",
    kind="text_encoder",
    markers=("layers.0.self_attn.q_proj.weight",),
    signs=(("embed_tokens.weight", "a language model (text encoder)"),),
    loader_node="Load Sana Text Encoder (Gemma-2, Velox)",
    gguf_architecture="gemma2",
    llama_cpp_marker="blk.0.post_ffw_norm.weight",
    keep_float=(r"embed_tokens", r"norm"),
)

# The order detection walks (first match wins; a family that refines another is checked before
# it) and messages list.
FAMILIES: dict[str, Family] = {f.name: f for f in (SANA, WAN, VIDEOCRAFTER, SANA_VIDEO, SANA_CONTROLNET, UMT5,
                                                   GEMMA2)}


def family(name: str) -> Family:
    """The family called ``name``; KeyError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"no Velox family {name!r} (known: {', '.join(FAMILIES)})") from None


def families_of_kind(*kinds: str) -> tuple[Family, ...]:
    return tuple(f for f in FAMILIES.values() if f.kind in kinds)


def family_by_architecture(architecture: str | None) -> Family | None:
    """The family a GGUF's ``general.architecture`` names (its own or an alias), else None."""
    return next((f for f in FAMILIES.values()
                 if architecture and architecture in (f.gguf_architecture, *f.gguf_aliases)), None)


def family_by_markers(keys: Iterable[str], candidates: Iterable[Family] | None = None) -> Family | None:
    """The first family (of ``candidates``, default all) whose markers the keys carry."""
    keys = list(keys)
    return next((f for f in (FAMILIES.values() if candidates is None else candidates) if f.marks(keys)), None)


def family_by_diffusers_class(class_name: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if class_name and f.diffusers_class == class_name), None)


def diffusers_folder_family(folder: str | Path) -> Family | None:
    """The family whose diffusers class a folder's ``transformer/config.json`` (else its own
    ``config.json``) names; None when neither names a Velox family or cannot be read."""
    folder = Path(folder)
    for config in (folder / "transformer" / "config.json", folder / "config.json"):
        if config.is_file():
            try:
                class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                return None
            return family_by_diffusers_class(class_name if isinstance(class_name, str) else None)
    return None


def lora_fits(lora_family: str, model_family: str) -> bool:
    """Whether a LoRA detected as ``lora_family`` may patch a model of ``model_family``: the same
    family, or one the model's family refines (module names alike: a Sana-named LoRA on SANA-Video;
    shapes are still checked layer by layer)."""
    return lora_family == model_family or FAMILIES[model_family].refines == lora_family


def detection_order() -> tuple[Family, ...]:
    """FAMILIES with every family that refines another first: its files carry the other's keys too."""
    return tuple(sorted(FAMILIES.values(), key=lambda f: f.refines is None))


def foreign_signs(exclude: str) -> tuple[tuple[str, str], ...]:
    """(key fragment, what the file is) of every family but ``exclude``, then of ``OTHER_MODELS``:
    in ``FAMILIES`` order (``identify`` checks the families that refine another first)."""
    own = tuple(sign for f in FAMILIES.values() if f.name != exclude for sign in f.signs)
    return own + OTHER_MODELS


def identify(keys: Iterable[str], exclude: Iterable[str] = (),
             first: tuple[tuple[str, str], ...] = ()) -> tuple[str, Family | None] | None:
    """(what a checkpoint with these keys is, the Velox family it belongs to or None), judged by the
    ``first`` signs, then every family's but ``exclude``'s, then ``OTHER_MODELS``; None if unknown."""
    keys, exclude = list(keys), set(exclude)
    signs = [(fragment, what, None) for fragment, what in first]
    signs += [(fragment, what, f) for f in detection_order() if f.name not in exclude for fragment, what in f.signs]
    signs += [(fragment, what, None) for fragment, what in OTHER_MODELS]
    return next(((what, owner) for fragment, what, owner in signs if any(fragment in k for k in keys)), None)


def refusal(what: str, owner: Family | None, wanted: Family) -> str:
    """``looks like <what>, not <wanted>`` and, for a Velox family, the node that loads it."""
    hint = f"; load it with '{owner.loader_node}'" if owner is not None and owner.loader_node else ""
    return f"looks like {what}, not {wanted.noun}{hint}"


def refuse_foreign(keys: Iterable[str], wanted: Family, path: str | Path | None, expected: str) -> NoReturn:
    """Raise VeloxLoadError naming what a checkpoint that is not ``wanted`` looks like."""
    keys = list(keys)
    found = identify(keys, exclude=(wanted.name,))
    what, owner = found or (f"an unknown model (first keys: {', '.join(keys[:4]) or 'none'})", None)
    raise VeloxLoadError(path, refusal(what, owner, wanted), expected)

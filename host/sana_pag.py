"""Perturbed-attention guidance for Sana's linear attention, as a MODEL patch.

Official rule (NVlabs Sana ``app/sana_pipeline.py``, ``pag_applied_layers``):
``out = uncond + cfg * (cond - uncond) + pag * (cond - cond_perturbed)``, where the perturbed
branch replaces one block's linear self-attention by the identity map (``proj(V)``). Core's
PerturbedAttentionGuidance does the same for UNets (comfy_extras/nodes_pag.py): a post-CFG function
runs one extra cond pass with an ``attn1`` replace patch. Here the patch is Sana's own hook,
``patches_replace["attn1"][("sana_block", i)]``. The combination is linear with weights summing to
one, so applying it to ComfyUI's denoised estimates equals applying it to the velocities.
"""

from __future__ import annotations

import comfy.model_patcher
import comfy.samplers
import torch

from .sana_model import SanaModel

OFFICIAL_PAG_LAYER = {20: 8, 28: 14}  # depth -> pag_applied_layers: Sana 1.6B (20 blocks), 0.6B (28 blocks)
AUTO_LAYER = -1


def identity_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """PAG's perturbed self-attention: every token attends only to itself, so the output is V."""
    return v


def sana_depth(model) -> int:
    """Number of blocks of a Sana MODEL; a ValueError naming the node for any other model."""
    base = getattr(model, "model", None)
    if not isinstance(base, SanaModel):
        raise ValueError(f"VeloxSanaPAG: expects a Sana MODEL (VeloxSanaLoader), got {type(base).__name__}")
    return len(base.diffusion_model.blocks)


def pag_layer(depth: int, layer: int) -> int:
    """The block to perturb: ``layer``, or with AUTO_LAYER the official one (the middle block for
    depths without an official value)."""
    if layer == AUTO_LAYER:
        return OFFICIAL_PAG_LAYER.get(depth, depth // 2)
    if not 0 <= layer < depth:
        raise ValueError(f"VeloxSanaPAG: layer {layer} is outside this model's blocks 0..{depth - 1} "
                         f"(-1 picks the official block)")
    return layer


def with_sana_pag(model, scale: float, layer: int = AUTO_LAYER):
    """A clone of MODEL that adds ``scale * (cond - cond_perturbed)`` after CFG at every step."""
    block = pag_layer(sana_depth(model), layer)
    patched = model.clone()

    def post_cfg_function(args: dict) -> torch.Tensor:
        if scale == 0:
            return args["denoised"]
        options = comfy.model_patcher.set_model_options_patch_replace(
            args["model_options"].copy(), identity_linear_attention, "attn1", "sana_block", block)
        (perturbed,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                      options)
        return args["denoised"] + (args["cond_denoised"] - perturbed) * scale

    patched.set_model_sampler_post_cfg_function(post_cfg_function)
    return patched

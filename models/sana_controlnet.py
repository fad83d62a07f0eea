"""Sana ControlNet (the first N Sana blocks copied, zero-initialised projections in and out), pure PyTorch.

Upstream: NVlabs/Sana ``diffusion/model/nets/sana_multi_scale_controlnet.py`` (``ControlSanaMSBlock``:
``copied_block``, ``before_proj`` on block 0, ``after_proj`` on every block) and diffusers 0.42.1
``SanaControlNetModel``, whose computation this module reproduces:

- the control latent goes through the ControlNet's own copy of ``x_embedder`` and ``before_proj`` and is
  added to the embedded noisy latent;
- that sum runs through the copied blocks (same timestep, caption and mask as the base model);
- ``after_proj`` of block k's output is residual k, which the base transformer adds to the output of its
  block k + 1 (``SanaTransformer``'s ``control`` argument).

Module names are the official checkpoint's (``controlnet.0.before_proj``, ``controlnet.3.copied_block.attn.qkv``,
``controlnet.3.after_proj``); ``loaders/sana_controlnet_keys.py`` maps diffusers' names onto them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .sana import (
    DEFAULT_OPERATIONS,
    CaptionEmbedder,
    PatchEmbed,
    SanaBlock,
    TimestepEmbedder,
    adaln_modulation,
    adaln_single_projection,
    batch_timesteps,
    caption_norm,
    embed_caption,
    sincos_pos_embed_2d,
)

DEFAULT_COPIED_BLOCKS = 7  # both official ControlNets (600M and 1600M) copy 7 blocks


class ControlBlock(nn.Module):
    """ControlSanaMSBlock: a copied Sana block, ``before_proj`` (block 0 only) and ``after_proj``."""

    def __init__(self, index: int, hidden_size: int, num_heads: int, linear_head_dim: int, mlp_ratio: float,
                 qk_norm: bool, device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.copied_block = SanaBlock(hidden_size, num_heads, linear_head_dim, mlp_ratio, qk_norm,
                                      operations=operations, **factory)
        self.before_proj = operations.Linear(hidden_size, hidden_size, **factory) if index == 0 else None
        self.after_proj = operations.Linear(hidden_size, hidden_size, **factory)


class SanaControlNet(nn.Module):
    """The ControlNet half of SanaMSControlNet, with the embedders it shares with its base model."""

    def __init__(
        self,
        hidden_size: int = 2240,
        depth: int = DEFAULT_COPIED_BLOCKS,
        num_heads: int = 20,
        linear_head_dim: int = 32,
        in_channels: int = 32,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        patch_size: int = 1,
        qk_norm: bool = False,
        use_pe: bool = False,
        sample_size: int = 32,
        pe_interpolation: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        operations: Any = None,
        **kwargs: Any,  # SanaConfig's fields a ControlNet does not use (out_channels, guidance, shift...)
    ):
        """``depth`` is the number of copied blocks (7 in the releases)."""
        super().__init__()
        factory = dict(device=device, dtype=dtype, operations=DEFAULT_OPERATIONS if operations is None else operations)
        self.hidden_size = hidden_size
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.use_pe = use_pe
        self.base_size = sample_size // patch_size
        self.pe_interpolation = pe_interpolation

        # 1. embeddings (the base model's, copied)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, **factory)
        self.t_embedder = TimestepEmbedder(hidden_size, **factory)
        self.t_block = adaln_single_projection(hidden_size, **factory)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, **factory)
        self.attention_y_norm = caption_norm(hidden_size, **factory)
        # 2. copied blocks with their projections
        self.controlnet = nn.ModuleList(
            ControlBlock(i, hidden_size, num_heads, linear_head_dim, mlp_ratio, qk_norm, **factory)
            for i in range(depth)
        )

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """Control residuals for one denoising step.

        x: (B, in_channels, H, W) noisy latent, as the base model gets it; hint: (B, in_channels, H, W) the
        control image's latent (VAE-encoded, scaled like x); timesteps: (B,) sigma * 1000; context:
        (B, L, caption_channels); context_mask: (B, L) 1 keep / 0 pad. Returns ``depth`` tensors
        (B, H * W / p^2, C), each times ``scale``: residual k belongs after the base model's block k + 1.
        """
        check_control_latent(hint, x, self.in_channels)
        B, _, H, W = x.shape
        height, width = H // self.patch_size, W // self.patch_size
        dtype = x.dtype

        # 1. latent + before_proj(control latent), both through the same patch embedding (+ PE)
        tokens = self._embed(x, height, width)
        tokens = tokens + self.controlnet[0].before_proj(self._embed(hint.to(dtype), height, width))

        # 2. timestep, caption and mask exactly as the base model makes them
        t0 = adaln_modulation(self.t_block, self.t_embedder(batch_timesteps(timesteps, B, x.device), dtype))
        y, mask_bias = embed_caption(self.y_embedder, self.attention_y_norm, context, context_mask, dtype, x.device)

        # 3. copied blocks; after_proj of each output is one residual
        residuals = []
        for block in self.controlnet:
            tokens = block.copied_block(tokens, y, t0, mask_bias, height, width)
            residuals.append(block.after_proj(tokens) * scale)
        return residuals

    def _embed(self, latent: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, in, H, W) -> (B, N, C) through x_embedder, plus the sincos PE when the model has one."""
        tokens = self.x_embedder(latent)
        if self.use_pe:
            pe = sincos_pos_embed_2d(self.hidden_size, height, width, self.base_size, self.pe_interpolation,
                                     latent.device)
            tokens = tokens + pe.to(tokens.dtype)
        return tokens


def check_control_latent(hint: torch.Tensor, x: torch.Tensor, in_channels: int) -> None:
    """A control latent that cannot pair with x (wrong VAE, wrong size) is refused in words, before the
    patch embedding would fail on its shape. hint, x: (B, C, H, W)."""
    if hint.ndim != 4 or hint.shape[1] != in_channels:
        raise ValueError(
            f"Sana ControlNet: the control image's latent has shape {list(hint.shape)}, but the ControlNet needs "
            f"{in_channels} latent channels; encode the control image with Sana's DC-AE VAE (connect it to the "
            "'vae' input of Apply ControlNet)")
    if hint.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"Sana ControlNet: the control latent is {hint.shape[-1]}x{hint.shape[-2]} but the latent being "
            f"sampled is {x.shape[-1]}x{x.shape[-2]}; the control image must have the size of the generated "
            "image (32 pixels per latent cell)")

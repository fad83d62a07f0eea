"""The 3D UNet of VideoCrafter 1/2 and DynamiCrafter (lvdm ``openaimodel3d.UNetModel``), pure PyTorch.

Upstream: ``lvdm/modules/networks/openaimodel3d.py`` of AILab-CVC/VideoCrafter and Doubiiu/DynamiCrafter.
Every released variant is this one network with different flags (``UNet3DConfig``); module names equal
lvdm's, so the ``model.diffusion_model.*`` keys of a release load with the prefix stripped.

Layout: SD 2.x channels 320/640/1280/1280 at 64-dim heads, attention at ds 1, 2, 4. Each attention
level has a SpatialTransformer (per frame, text [+ image] cross-attention) then a TemporalTransformer
(per pixel, over frames). ``init_attn`` is one more temporal transformer after the stem; ResBlocks may
carry a temporal Conv3d block (``temopral_conv``). Timestep and fps / frame-stride embeddings are
sinusoidal(320) -> MLP(1280) and summed.

Shapes: x (B, C_in, T, H, W) latent video (DynamiCrafter: C_in = 8, noise and the image latent
concatenated); timesteps (B,); context (B, L, context_dim) where L = 77 text tokens, or
77 + n image tokens shared by all frames (VideoCrafter 1 I2V), or 77 + T*16 per-frame image tokens
(DynamiCrafter); fps (B,) or None. Returns (B, C_out, T, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .unet3d_attention import (
    DEFAULT_OPERATIONS,
    TEXT_CONTEXT_LEN,
    AttentionFn,
    SpatialTransformer,
    TemporalTransformer,
)
from .unet3d_blocks import Downsample, ResBlock, TemporalConvBlock, Upsample, timestep_embedding

# lvdm init_attn: TemporalTransformer(model_channels, n_heads=8, d_head=num_head_channels), built without
# use_linear, so its proj_in / proj_out are 1x1 Conv1d.
INIT_ATTN_HEADS = 8


@dataclass(frozen=True)
class UNet3DConfig:
    """Hyperparameters of one lvdm 3D UNet; defaults are VideoCrafter 2's ``inference_t2v_512_v2.0.yaml``.

    ``default_fps`` is what the network embeds when no fps / frame stride is given (VideoCrafter: 16,
    DynamiCrafter: ``default_fs``). ``image_tokens_per_frame`` is DynamiCrafter's Resampler queries per
    frame: a context of exactly 77 + T * that many tokens is split per frame (lvdm's "HARD CODE" rule).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (1, 2, 4)  # downsample factors; the yaml lists 4, 2, 1
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    temporal_conv: bool = True
    tempspatial_aware: bool = False
    use_relative_position: bool = False
    use_causal_attention: bool = False
    temporal_length: int = 16
    addition_attention: bool = True
    fps_cond: bool = True
    default_fps: int = 16
    image_cross_attention: bool = False
    image_cross_attention_scale_learnable: bool = False
    image_tokens_per_frame: int = 16

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


class UNet3D(nn.Module):
    """lvdm 3D UNet; see the module docstring for shapes. ``attention`` replaces SDPA (ComfyUI's)."""

    def __init__(self, config: UNet3DConfig, device=None, dtype=None, operations=DEFAULT_OPERATIONS,
                 attention: AttentionFn | None = None):
        super().__init__()
        self.config = config
        self.dtype = dtype or torch.float32  # storage dtype, read by ComfyUI's BaseModel.get_dtype
        self._factory = dict(device=device, dtype=dtype, operations=operations)
        self._attention = attention
        c, emb_dim = config.model_channels, config.time_embed_dim
        self.time_embed = self._mlp(c, emb_dim)
        if config.fps_cond:
            self.fps_embedding = self._mlp(c, emb_dim)
        self.input_blocks = nn.ModuleList([nn.ModuleList([
            operations.Conv2d(config.in_channels, c, 3, padding=1, device=device, dtype=dtype)])])
        if config.addition_attention:
            self.init_attn = nn.ModuleList([
                self._temporal(c, INIT_ATTN_HEADS, config.num_head_channels, use_linear=False)])
        skip_channels = self._build_input_blocks()
        ch = c * config.channel_mult[-1]
        self.middle_block = nn.ModuleList([
            self._resblock(ch, ch), *self._attention_layers(ch), self._resblock(ch, ch)])
        self._build_output_blocks(skip_channels, ch)
        self.out = nn.Sequential(
            operations.GroupNorm(32, c, device=device, dtype=dtype), nn.SiLU(),
            operations.Conv2d(c, config.out_channels, 3, padding=1, device=device, dtype=dtype))

    # ------------------------------------------------------------------ construction
    def _mlp(self, dim_in, dim_out):
        linear, f = self._factory["operations"].Linear, dict(device=self._factory["device"],
                                                             dtype=self._factory["dtype"])
        return nn.Sequential(linear(dim_in, dim_out, **f), nn.SiLU(), linear(dim_out, dim_out, **f))

    def _resblock(self, ch_in, ch_out):
        cfg = self.config
        return ResBlock(ch_in, cfg.time_embed_dim, ch_out, temporal_conv=cfg.temporal_conv,
                        tempspatial_aware=cfg.tempspatial_aware, **self._factory)

    def _temporal(self, ch, heads, dim_head, use_linear: bool = True):
        cfg = self.config
        return TemporalTransformer(ch, heads, dim_head, cfg.transformer_depth, use_linear=use_linear,
                                   relative_position=cfg.use_relative_position,
                                   temporal_length=cfg.temporal_length, causal=cfg.use_causal_attention,
                                   attention=self._attention, **self._factory)

    def _attention_layers(self, ch):
        cfg = self.config
        heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        spatial = SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                     image_cross_attention=cfg.image_cross_attention,
                                     image_scale_learnable=cfg.image_cross_attention_scale_learnable,
                                     attention=self._attention, **self._factory)
        return [spatial, self._temporal(ch, heads, dim_head)]

    def _build_input_blocks(self) -> list[int]:
        cfg = self.config
        ch, ds, skips = cfg.model_channels, 1, [cfg.model_channels]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [self._resblock(ch, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers += self._attention_layers(ch)
                self.input_blocks.append(nn.ModuleList(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch, **self._factory)]))
                skips.append(ch)
                ds *= 2
        self._bottom_ds = ds
        return skips

    def _build_output_blocks(self, skips: list[int], ch: int) -> None:
        cfg = self.config
        ds = self._bottom_ds
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [self._resblock(ch + skips.pop(), mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers += self._attention_layers(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, **self._factory))
                    ds //= 2
                self.output_blocks.append(nn.ModuleList(layers))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                fps: torch.Tensor | None = None) -> torch.Tensor:
        b, _, t, h, w = x.shape
        emb = self._embedding(timesteps, fps, b, x).repeat_interleave(t, dim=0)
        context = self._frame_context(context, t)
        hidden = x.transpose(1, 2).reshape(b * t, -1, h, w)
        skips = []
        for index, block in enumerate(self.input_blocks):
            hidden = self._run(block, hidden, emb, context, b)
            if index == 0 and self.config.addition_attention:
                hidden = self._run(self.init_attn, hidden, emb, context, b)
            skips.append(hidden)
        hidden = self._run(self.middle_block, hidden, emb, context, b)
        for block in self.output_blocks:
            hidden = self._run(block, torch.cat([hidden, skips.pop()], dim=1), emb, context, b)
        out = self.out(hidden)
        return out.view(b, t, -1, h, w).transpose(1, 2)

    def _embedding(self, timesteps, fps, batch, x) -> torch.Tensor:
        """(B, 4*model_channels): time MLP (+ fps / frame-stride MLP) of sinusoidal(model_channels)."""
        c = self.config.model_channels
        device, dtype = x.device, x.dtype  # compute in the activations' dtype (ComfyUI casts weights to it)
        emb = self.time_embed(timestep_embedding(timesteps.reshape(-1), c).to(dtype))
        if self.config.fps_cond:
            if fps is None:
                fps = torch.full((batch,), self.config.default_fps, device=device, dtype=torch.long)
            fps = fps.reshape(-1).to(device)
            if fps.numel() == 1 and batch > 1:
                fps = fps.expand(batch)
            emb = emb + self.fps_embedding(timestep_embedding(fps, c).to(dtype))
        return emb

    def _frame_context(self, context: torch.Tensor, t: int) -> torch.Tensor:
        """(B, L, D) -> (B*T, L', D): per-frame image tokens if L = 77 + T*n, else the same tokens per frame."""
        per_frame = self.config.image_tokens_per_frame
        if self.config.image_cross_attention and context.shape[1] == TEXT_CONTEXT_LEN + t * per_frame:
            text, image = context[:, :TEXT_CONTEXT_LEN], context[:, TEXT_CONTEXT_LEN:]
            image = image.reshape(-1, per_frame, image.shape[-1])  # (B*T, n, D), frame-major per sample
            return torch.cat([text.repeat_interleave(t, dim=0), image], dim=1)
        return context.repeat_interleave(t, dim=0)

    @staticmethod
    def _run(block: nn.ModuleList, hidden, emb, context, batch_size: int):
        """lvdm TimestepEmbedSequential: dispatch on the layer kind; temporal layers see (B, C, T, H, W)."""
        for layer in block:
            if isinstance(layer, ResBlock):
                hidden = layer(hidden, emb, batch_size)
            elif isinstance(layer, SpatialTransformer):
                hidden = layer(hidden, context)
            elif isinstance(layer, TemporalTransformer):
                bt, c, h, w = hidden.shape
                video = hidden.view(batch_size, bt // batch_size, c, h, w).transpose(1, 2)
                hidden = layer(video).transpose(1, 2).reshape(bt, c, h, w)
            else:
                hidden = layer(hidden)
        return hidden


__all__ = ["UNet3D", "UNet3DConfig", "TemporalConvBlock"]

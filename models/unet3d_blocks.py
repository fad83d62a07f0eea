"""Convolutional blocks of the VideoCrafter / DynamiCrafter 3D UNet, pure PyTorch.

Upstream: ``lvdm/modules/networks/openaimodel3d.py`` (ResBlock, TemporalConvBlock, Downsample,
Upsample) and ``lvdm/models/utils_diffusion.py`` (timestep_embedding). Names equal lvdm's, including
the misspelled ``temopral_conv`` attribute that the released checkpoints carry.

Activations are (B*T, C, H, W) frames; only the temporal convolution sees (B, C, T, H, W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .unet3d_attention import DEFAULT_OPERATIONS, GROUPS


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (N,) timesteps -> (N, dim) float32 (lvdm order: cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _group_norm(channels, device, dtype, operations):
    return operations.GroupNorm(GROUPS, channels, device=device, dtype=dtype)


class TemporalConvBlock(nn.Module):
    """Four GroupNorm-SiLU-Conv3d stages over frames (kernel (3,1,1)) with a residual (ModelScope style).

    ``conv1`` is [GN, SiLU, Conv3d]; ``conv2``..``conv4`` are [GN, SiLU, Dropout, Conv3d].
    With ``spatial_aware`` (no released config) DynamiCrafter uses (3,3,1)/(3,1,3) kernels.
    """

    def __init__(self, channels: int, spatial_aware: bool = False, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        kernel_h, pad_h = ((3, 3, 1), (1, 1, 0)) if spatial_aware else ((3, 1, 1), (1, 0, 0))
        kernel_w, pad_w = ((3, 1, 3), (1, 0, 1)) if spatial_aware else ((3, 1, 1), (1, 0, 0))

        def stage(kernel, pad, dropout: bool):
            conv = operations.Conv3d(channels, channels, kernel, padding=pad, device=device, dtype=dtype)
            layers = [_group_norm(channels, device, dtype, operations), nn.SiLU()]
            return nn.Sequential(*layers, *([nn.Dropout(0.0)] if dropout else []), conv)

        self.conv1 = stage(kernel_h, pad_h, False)
        self.conv2 = stage(kernel_w, pad_w, True)
        self.conv3 = stage(kernel_h, pad_h, True)
        self.conv4 = stage(kernel_w, pad_w, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """SD ResBlock (no scale-shift norm) plus an optional temporal conv block after the residual.

    x: (B*T, C_in, H, W); emb: (B*T, emb_channels); returns (B*T, C_out, H, W).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 temporal_conv: bool = False, tempspatial_aware: bool = False,
                 device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        out_channels = out_channels or channels
        conv = operations.Conv2d
        self.in_layers = nn.Sequential(
            _group_norm(channels, device, dtype, operations), nn.SiLU(),
            conv(channels, out_channels, 3, padding=1, device=device, dtype=dtype))
        self.emb_layers = nn.Sequential(nn.SiLU(), operations.Linear(emb_channels, out_channels,
                                                                     device=device, dtype=dtype))
        self.out_layers = nn.Sequential(
            _group_norm(out_channels, device, dtype, operations), nn.SiLU(), nn.Dropout(0.0),
            conv(out_channels, out_channels, 3, padding=1, device=device, dtype=dtype))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv(channels, out_channels, 1, device=device, dtype=dtype)
        self.use_temporal_conv = temporal_conv
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, tempspatial_aware, device=device,
                                                   dtype=dtype, operations=operations)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch_size: int) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if not self.use_temporal_conv:
            return h
        bt, c, hh, ww = h.shape
        video = h.view(batch_size, bt // batch_size, c, hh, ww).transpose(1, 2)
        video = self.temopral_conv(video)
        return video.transpose(1, 2).reshape(bt, c, hh, ww)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``)."""

    def __init__(self, channels: int, device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.op = operations.Conv2d(channels, channels, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (``conv``)."""

    def __init__(self, channels: int, device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

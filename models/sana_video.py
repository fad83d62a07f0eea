"""SANA-Video transformer (block linear DiT for text/image-to-video), pure PyTorch.

Upstream: NVlabs/Sana ``diffusion/model/nets/sana_multi_scale_video.py`` (``SanaMSVideo`` with
``attn_type: LiteLAReLURope``, ``ffn_type: GLUMBConvTemp``, ``pos_embed_type: wan_rope``) and
``sana_blocks.py`` / ``basic_modules.py``; numerically checked against diffusers 0.42
``SanaVideoTransformer3DModel``. Module names equal the official checkpoint names
(``blocks.N.attn.qkv``, ``blocks.N.mlp.t_conv`` ...); ``loaders/sana_video_keys.py`` maps the
diffusers layout onto them. The 1x1 convs of the Mix-FFN are ``Linear`` layers holding 2-D
weights, as in ``models.sana`` (whose caption embedder and norm, timestep embedder, adaLN-single,
cross-attention and spatial GLUMBConv are reused here unchanged).

Differences from image Sana: a 3-D patch embedding, ReLU linear attention whose numerator sees
Wan's 3-D rotary embedding (applied after the ReLU, the normaliser uses the un-rotated q and k),
a temporal (3, 1) conv after the Mix-FFN, and adaLN modulation that may differ per latent frame
(image-to-video runs the conditioning frame at t = 0).

Layout: tokens stay (B, N, C), N = frames * height * width in that order (frame-major), from the
patch embedding to the final layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import sana
from .sana import (
    CaptionEmbedder,
    CrossAttention,
    GLUMBConv,
    LinearAttention,
    TimestepEmbedder,
    adaln_modulation,
    adaln_single_projection,
    caption_norm,
    embed_caption,
)

DEFAULT_OPERATIONS = SimpleNamespace(**vars(sana.DEFAULT_OPERATIONS), Conv3d=nn.Conv3d)
ROPE_THETA = 10000.0  # WanRotaryPosEmbed's theta


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SanaVideoConfig:
    """Hyperparameters of one SANA-Video transformer; field names are the constructor's arguments.

    ``flow_shift``, ``sample_size``, ``vae`` and ``name`` say how to sample and decode it and which
    release it is; they do not change the network. ``sample_size`` is diffusers' latent base size,
    which its pipeline uses to pick the aspect-ratio bins (30: 480p, 22: 720p).
    """

    hidden_size: int = 2240
    depth: int = 20
    num_heads: int = 20  # softmax cross-attention heads (head dim = hidden_size / num_heads)
    linear_head_dim: int = 112  # linear self-attention head size; RoPE splits each head t/h/w
    in_channels: int = 16
    out_channels: int = 16
    caption_channels: int = 2304
    mlp_ratio: float = 3.0
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width)
    qk_norm: bool = True  # RMS q/k norm across heads in the linear self-attention
    cross_norm: bool = True  # the same in the cross-attention
    t_kernel_size: int = 3  # temporal conv of GLUMBConvTemp
    flow_shift: float = 8.0
    sample_size: int = 30
    vae: str = "wan2.1"  # "wan2.1" (16 channels, 4x8x8) or "ltx2" (128 channels, 8x32x32)
    name: str = "custom"

    def model_kwargs(self) -> dict[str, Any]:
        """The architecture fields only, as keyword arguments for ``SanaVideoTransformer``."""
        kwargs = dataclasses.asdict(self)
        for field in _SAMPLING_FIELDS:
            kwargs.pop(field)
        return kwargs

    def describe(self) -> str:
        """One line for logs: preset name, VAE, width and depth."""
        return f"{self.name} (SANA-Video, {self.vae} VAE, hidden {self.hidden_size}, depth {self.depth})"


_SAMPLING_FIELDS = ("flow_shift", "sample_size", "vae", "name")

SANA_VIDEO_PRESETS: dict[str, SanaVideoConfig] = {
    # Efficient-Large-Model/SANA-Video_2B_480p(_diffusers): Wan 2.1 VAE, 2x2 patches
    "sana_video_2b_480p": SanaVideoConfig(name="sana_video_2b_480p"),
    # SanaMSVideo_2000M_P1_D20 on the LTX-2 VAE (128 latent channels, 32x spatial), 1x1 patches
    "sana_video_2b_720p": SanaVideoConfig(
        name="sana_video_2b_720p", in_channels=128, out_channels=128, patch_size=(1, 1, 1), sample_size=22,
        vae="ltx2",
    ),
}


# ----------------------------------------------------------------------------------------------
# Functional pieces
# ----------------------------------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per head given to (frame, height, width) positions, as Wan: h = w = 2 * (d // 6)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def wan_rope_3d(head_dim: int, frames: int, height: int, width: int, device: torch.device,
                theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-D rotary angles for a (frames, height, width) token grid, frame-major.

    Each axis gets its own frequency ladder ``theta ** (-2i / axis_dim)`` (float64, as diffusers).
    Returns (cos, sin), each (N, head_dim / 2) float32: one angle per rotated channel pair.
    """
    angles = []
    for size, dim in zip((frames, height, width), rope_axis_dims(head_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
        angles.append(torch.outer(torch.arange(size, device=device, dtype=torch.float64), freqs))
    f, h, w = angles
    grid = torch.cat([
        f[:, None, None].expand(frames, height, width, -1),
        h[None, :, None].expand(frames, height, width, -1),
        w[None, None, :].expand(frames, height, width, -1),
    ], dim=-1).reshape(frames * height * width, -1)
    return grid.cos().float(), grid.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) by the angle of pair i.

    x: (B, h, N, d); cos, sin: (N, d / 2). Returns (B, h, N, d) in x's dtype.
    """
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def rope_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                          heads: int) -> torch.Tensor:
    """SANA-Video's linear attention (LiteLAReLURope), in fp32 as the official ``fp32_attention``.

    q, k, v: (B, N, C) projections; rope: (cos, sin) of ``wan_rope_3d``. Per head, with
    q+ = relu(q), k+ = relu(k) and R the rotation:
    ``out = R(q+) @ (R(k+)^T v) / (q+ . sum_n k+ + eps)`` -- the rotation enters the numerator only,
    so the normaliser stays positive. Returns (B, N, C) in v's dtype.
    """
    B, N, C = q.shape
    q_h, k_h, v_h = (t.view(B, N, heads, C // heads).transpose(1, 2).float() for t in (q, k, v))
    q_h, k_h = F.relu(q_h), F.relu(k_h)  # (B, h, N, d)
    normaliser = q_h @ k_h.sum(dim=2).unsqueeze(-1) + sana.LINEAR_ATTENTION_EPS  # (B, h, N, 1)
    kv = apply_rope(k_h, *rope).mT @ v_h  # (B, h, d, d)
    out = (apply_rope(q_h, *rope) @ kv) / normaliser
    return out.transpose(1, 2).reshape(B, N, C).to(v.dtype)


def frame_timesteps(timesteps: torch.Tensor | float, batch: int, frames: int, device: torch.device) -> torch.Tensor:
    """Timesteps as (B, 1) (one per sample) or (B, frames) (one per latent frame), float32.

    Accepts a scalar, (B,), (1,), (B, 1) or (B, frames): image-to-video passes 0 for the
    conditioning frame and t for the others (diffusers' per-token ``t * (1 - mask)``, which is
    constant within each frame).
    """
    t = torch.as_tensor(timesteps, device=device).float()
    if t.ndim <= 1:
        return t.reshape(-1, 1).expand(batch, 1)
    if t.ndim == 2 and t.shape[1] in (1, frames):
        return t.expand(batch, -1)
    raise ValueError(f"SANA-Video: timesteps of shape {list(t.shape)}; expected (batch,) or (batch, {frames}) "
                     "(one per latent frame)")


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN per frame: x (B, Ft, M, C); shift, 1 + scale: (B, Ft, 1, C)."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), scale_plus_one)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class PatchEmbed3D(nn.Module):
    """x_embedder (PatchEmbedMS3D): Conv3d(in, C, k=p, s=p); (B, in, F, H, W) -> (B, N, C)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int, device=None,
                 dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.proj = operations.Conv3d(in_channels, hidden_size, tuple(patch_size), stride=tuple(patch_size),
                                      bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class RopeLinearAttention(LinearAttention):
    """LiteLAReLURope: Sana's LiteLA (qkv without bias, RMS q/k norm, proj) plus 3-D RoPE."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.proj(rope_linear_attention(q, k, v, rope, self.heads))
        if out.dtype == torch.float16:  # as image Sana: keep fp16 finite
            out = out.clip(-65504, 65504)
        return out


class GLUMBConvTemp(GLUMBConv):
    """GLUMBConvTemp: the spatial Mix-FFN per frame, then x + t_conv(x), a (3, 1) conv over frames."""

    def __init__(self, hidden_size: int, mlp_ratio: float, t_kernel_size: int = 3, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__(hidden_size, mlp_ratio, device, dtype, operations)
        self.t_conv = operations.Conv2d(hidden_size, hidden_size, (t_kernel_size, 1),
                                        padding=(t_kernel_size // 2, 0), bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """x: (B, N, C) with N = frames * height * width -> (B, N, C)."""
        B, N, C = x.shape
        h = super().forward(x.view(B * frames, height * width, C), height, width)
        h = h.view(B, frames, height * width, C)
        # (B, F, HW, C) permuted to (B, C, F, HW) is a channels_last view: the conv runs without a copy
        temporal = self.t_conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return (h + temporal).reshape(B, N, C)


class SanaVideoBlock(nn.Module):
    """SanaVideoMSBlock: adaLN linear self-attention with RoPE, cross-attention, GLUMBConvTemp."""

    def __init__(self, hidden_size: int, num_heads: int, linear_head_dim: int, mlp_ratio: float,
                 qk_norm: bool, cross_norm: bool, t_kernel_size: int = 3, norm_eps: float = 1e-6, device=None,
                 dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.norm_eps = norm_eps
        self.scale_shift_table = nn.Parameter(torch.empty(6, hidden_size, device=device, dtype=dtype))
        self.attn = RopeLinearAttention(hidden_size, linear_head_dim, qk_norm, device, dtype, operations)
        self.cross_attn = CrossAttention(hidden_size, num_heads, cross_norm, device, dtype, operations)
        self.mlp = GLUMBConvTemp(hidden_size, mlp_ratio, t_kernel_size, device, dtype, operations)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, mask_bias: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor], frames: int, height: int, width: int) -> torch.Tensor:
        """x: (B, N, C); y: (B, L, C); t0: (B, Ft, 6, 1, C) from ``adaln_single`` (Ft = 1 or frames,
        1 already added to the two scale rows); mask_bias: (B, 1, 1, L) or None. Returns (B, N, C)."""
        B, N, C = x.shape
        by_frame = (B, t0.shape[1], -1, C)  # modulation broadcasts over each frame's tokens
        modulation = self.scale_shift_table.to(device=x.device, dtype=x.dtype)[:, None, :] + t0
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.unbind(2)  # (B, Ft, 1, C)
        # 1. linear self-attention with RoPE
        attn = self.attn(_modulate(x.view(by_frame), shift_msa, scale_msa, self.norm_eps).view(B, N, C), rope)
        x = torch.addcmul(x.view(by_frame), gate_msa, attn.view(by_frame)).view(B, N, C)
        # 2. cross-attention to the caption (no norm, no gate)
        x = x + self.cross_attn(x, y, mask_bias)
        # 3. Mix-FFN with temporal conv
        ffn_in = _modulate(x.view(by_frame), shift_mlp, scale_mlp, self.norm_eps).view(B, N, C)
        ffn = self.mlp(ffn_in, frames, height, width)
        return torch.addcmul(x.view(by_frame), gate_mlp, ffn.view(by_frame)).view(B, N, C)


class VideoFinalLayer(nn.Module):
    """T2IFinalLayer over 3-D patches: adaLN (shift, scale from its table + t) then Linear(C, pt*ph*pw*out)."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int, norm_eps: float = 1e-6,
                 device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.norm_eps = norm_eps
        self.scale_shift_table = nn.Parameter(torch.empty(2, hidden_size, device=device, dtype=dtype))
        self.linear = operations.Linear(hidden_size, patch_volume * out_channels, bias=True, device=device,
                                        dtype=dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C), t: (B, Ft, C) embedded timestep per frame (Ft = 1 or frames) -> (B, N, pt*ph*pw*out)."""
        B, N, C = x.shape
        table = self.scale_shift_table.to(device=x.device, dtype=x.dtype)
        shift, scale = (table[None, None] + t[:, :, None]).chunk(2, dim=2)  # (B, Ft, 1, C) each
        x = _modulate(x.view(B, t.shape[1], -1, C), shift, 1 + scale, self.norm_eps)
        return self.linear(x.view(B, N, C))


class SanaVideoTransformer(nn.Module):
    """SANA-Video DiT (SanaMSVideo) with official module names."""

    def __init__(
        self,
        hidden_size: int = 2240,
        depth: int = 20,
        num_heads: int = 20,
        linear_head_dim: int = 112,
        in_channels: int = 16,
        out_channels: int = 16,
        caption_channels: int = 2304,
        mlp_ratio: float = 3.0,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        qk_norm: bool = True,
        cross_norm: bool = True,
        t_kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        operations: Any = None,
        **kwargs: Any,  # ComfyUI's unet_config extras and SanaVideoConfig's sampling fields
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype, operations=DEFAULT_OPERATIONS if operations is None else operations)
        self.hidden_size = hidden_size
        self.patch_size = tuple(patch_size)
        self.out_channels = out_channels
        self.linear_head_dim = linear_head_dim

        # 1. embeddings
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size, **factory)
        self.t_embedder = TimestepEmbedder(hidden_size, **factory)
        self.t_block = adaln_single_projection(hidden_size, **factory)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, **factory)
        self.attention_y_norm = caption_norm(hidden_size, **factory)
        # 2. blocks
        self.blocks = nn.ModuleList(
            SanaVideoBlock(hidden_size, num_heads, linear_head_dim, mlp_ratio, qk_norm, cross_norm, t_kernel_size,
                           **factory)
            for _ in range(depth)
        )
        # 3. output
        self.final_layer = VideoFinalLayer(hidden_size, math.prod(self.patch_size), out_channels, **factory)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: (B, in_channels, F, H, W) latent video (F, H, W multiples of the patch size);
        timesteps: sigma * 1000, fractional, either (B,) or (B, F / pt) per latent frame
        (image-to-video: 0 for the conditioning frame); context: (B, L, caption_channels) Gemma
        features; context_mask: (B, L) 1 keep / 0 pad. Returns (B, out_channels, F, H, W).
        """
        options = transformer_options or {}
        B, _, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"SANA-Video: latent of {T} frames x {H} x {W} is not a multiple of the patch size "
                             f"{self.patch_size}; pad it first")
        frames, height, width = T // pt, H // ph, W // pw
        dtype = x.dtype

        # 1. patch embedding, rotary angles for this grid
        tokens = self.x_embedder(x)  # (B, N, C)
        rope = wan_rope_3d(self.linear_head_dim, frames, height, width, x.device)

        # 2. timestep embedding per sample or per frame, adaLN-single
        t_in = frame_timesteps(timesteps, B, frames, x.device)  # (B, Ft)
        t = self.t_embedder(t_in.reshape(-1), dtype).view(B, t_in.shape[1], -1)  # (B, Ft, C)
        t0 = self.adaln_single(t)  # (B, Ft, 6, 1, C)

        # 3. caption projection + y-norm, text mask as an additive bias
        y, mask_bias = embed_caption(self.y_embedder, self.attention_y_norm, context, context_mask, dtype, x.device)

        # 4. blocks
        tokens = self._run_blocks(tokens, y, t0, mask_bias, rope, (frames, height, width), options)

        # 5. final layer, unpatchify
        out = self.final_layer(tokens, t)  # (B, N, pt*ph*pw*out)
        return self._unpatchify(out, B, frames, height, width)

    def adaln_single(self, t: torch.Tensor) -> torch.Tensor:
        """(B, Ft, C) embedded timestep -> (B, Ft, 6, 1, C) modulation shared by all blocks (``adaln_modulation``)."""
        return adaln_modulation(self.t_block, t)

    def _run_blocks(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, mask_bias: torch.Tensor | None,
                    rope: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int], options: dict) -> torch.Tensor:
        """ComfyUI hook: ``patches_replace["dit"][("double_block", i)]`` replaces a whole block."""
        blocks_replace = options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.blocks):
            if ("double_block", i) not in blocks_replace:
                x = block(x, y, t0, mask_bias, rope, *grid)
                continue

            def block_wrap(args, block=block):
                return {"img": block(args["img"], args["txt"], args["vec"], args["txt_mask"], args["pe"], *grid)}

            x = blocks_replace[("double_block", i)](
                {"img": x, "txt": y, "vec": t0, "txt_mask": mask_bias, "pe": rope, "transformer_options": options},
                {"original_block": block_wrap},
            )["img"]
        return x

    def _unpatchify(self, x: torch.Tensor, batch: int, frames: int, height: int, width: int) -> torch.Tensor:
        """(B, N, pt*ph*pw*out) -> (B, out, F*pt, H*ph, W*pw), contiguous."""
        pt, ph, pw = self.patch_size
        x = x.view(batch, frames, height, width, pt, ph, pw, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(batch, self.out_channels, frames * pt, height * ph, width * pw)

    @classmethod
    def from_config(cls, config: SanaVideoConfig, device=None, dtype=None, operations=None) -> SanaVideoTransformer:
        """Build (uninitialised) from a ``SanaVideoConfig``."""
        return cls(**config.model_kwargs(), device=device, dtype=dtype, operations=operations)

"""Sana / Sana-1.5 / SANA-Sprint diffusion transformer (linear DiT), pure PyTorch.

Upstream: NVlabs/Sana ``diffusion/model/nets/sana_multi_scale.py`` (SanaMS, SanaMSCM) and
``sana_blocks.py``; numerically checked against diffusers ``SanaTransformer2DModel``.
Module names equal the official checkpoint names (``blocks.N.attn.qkv``, ``t_block.1`` ...), so
an official state dict loads as is; ``loaders/sana_keys.py`` maps every other layout onto them.
The 1x1 convs of GLUMBConv are ``Linear`` layers holding 2-D weights (the loader squeezes).

Layout: tokens stay (B, N, C) from the patch embedding to the final layer; the 3x3 depthwise
conv runs on a channels_last view of those tokens, so no transpose copies are made.
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

DEFAULT_OPERATIONS = SimpleNamespace(
    Linear=nn.Linear, Conv2d=nn.Conv2d, LayerNorm=nn.LayerNorm, RMSNorm=nn.RMSNorm
)
SPRINT_DEFAULT_GUIDANCE = 4.5  # SanaSprintPipeline's default guidance_scale
LINEAR_ATTENTION_EPS = 1e-15  # as diffusers' SanaLinearAttnProcessor2_0
MASK_BIAS = -10000.0  # additive bias for padded text tokens, as diffusers and the official SDPA path


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SanaConfig:
    """Hyperparameters of one Sana transformer; field names are the constructor's arguments.

    ``flow_shift`` and ``name`` describe how to sample it and which release it is; they do not
    change the network.
    """

    hidden_size: int = 2240
    depth: int = 20
    num_heads: int = 20  # softmax cross-attention heads (head dim = hidden_size / num_heads)
    linear_head_dim: int = 32  # ReLU linear self-attention head size
    in_channels: int = 32
    out_channels: int = 32
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    patch_size: int = 1
    qk_norm: bool = False  # RMS q/k norm across heads (Sana 1.5, Sprint)
    use_pe: bool = False  # sincos 2-D position embedding (2K, 4K)
    sample_size: int = 32  # latent side the PE was trained at (diffusers sample_size)
    pe_interpolation: float = 1.0  # diffusers interpolation_scale
    guidance_embeds: bool = False  # Sprint's cfg_embedder
    guidance_embeds_scale: float = 0.1
    timestep_norm_scale: float = 1.0  # timesteps are divided by this (Sprint: 1000)
    flow_shift: float = 3.0
    name: str = "custom"

    def model_kwargs(self) -> dict[str, Any]:
        """The architecture fields only, as keyword arguments for ``SanaTransformer``."""
        kwargs = dataclasses.asdict(self)
        for field in _SAMPLING_FIELDS:
            kwargs.pop(field)
        return kwargs

    @property
    def family(self) -> str:
        """``sprint``, ``sana-1.5``, ``sana-pe`` (2K/4K) or ``sana``."""
        if self.guidance_embeds:
            return "sprint"
        if self.qk_norm:
            return "sana-1.5"
        return "sana-pe" if self.use_pe else "sana"

    def describe(self) -> str:
        """One line for logs: preset name, family, width and depth."""
        return f"{self.name} ({self.family}, hidden {self.hidden_size}, depth {self.depth})"


_SAMPLING_FIELDS = ("flow_shift", "name")

_SANA_600M = dict(hidden_size=1152, depth=28, num_heads=16)
_SANA_1600M = dict(hidden_size=2240, depth=20, num_heads=20)
_SPRINT = dict(qk_norm=True, guidance_embeds=True, timestep_norm_scale=1000.0)

SANA_PRESETS: dict[str, SanaConfig] = {
    "sana_600m": SanaConfig(name="sana_600m", **_SANA_600M),
    "sana_1600m": SanaConfig(name="sana_1600m", **_SANA_1600M),
    "sana15_1600m": SanaConfig(name="sana15_1600m", qk_norm=True, **_SANA_1600M),
    "sana15_4800m": SanaConfig(name="sana15_4800m", qk_norm=True, **{**_SANA_1600M, "depth": 60}),
    "sana_1600m_2k": SanaConfig(
        name="sana_1600m_2k", use_pe=True, sample_size=64, pe_interpolation=1.0, **_SANA_1600M
    ),
    "sana_1600m_4k": SanaConfig(
        name="sana_1600m_4k", use_pe=True, sample_size=128, pe_interpolation=2.0, flow_shift=6.0,
        **_SANA_1600M,
    ),
    "sprint_600m": SanaConfig(name="sprint_600m", **_SPRINT, **_SANA_600M),
    "sprint_1600m": SanaConfig(name="sprint_1600m", **_SPRINT, **_SANA_1600M),
}


# ----------------------------------------------------------------------------------------------
# Functional pieces
# ----------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of fractional timesteps: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half)
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(
    dim: int, height: int, width: int, base_size: int, interpolation: float, device: torch.device
) -> torch.Tensor:
    """Sana / diffusers 2-D sincos position embedding for an (height, width) token grid.

    Positions on each axis are ``arange(n) / (n / base_size) / interpolation``; the first half
    of the channels encodes the column, the second half the row (diffusers' ``grid[0]`` is the
    w grid). Returns (1, height * width, dim) float32, token index = row * width + col.
    """
    rows = torch.arange(height, device=device, dtype=torch.float32) / (height / base_size) / interpolation
    cols = torch.arange(width, device=device, dtype=torch.float32) / (width / base_size) / interpolation
    grid_col = cols[None, :].expand(height, width).reshape(-1)
    grid_row = rows[:, None].expand(height, width).reshape(-1)
    return torch.cat([_sincos_1d(dim // 2, grid_col), _sincos_1d(dim // 2, grid_row)], dim=1)[None]


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos], frequencies in float64 like diffusers (fp32 on MPS)."""
    precise = torch.float32 if positions.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, device=positions.device, dtype=precise) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(positions.to(precise), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Sana's ReLU linear attention with fp32 accumulation, no attention matrix.

    q, k, v: (B, N, C) projections (ReLU is applied here). Per head:
    ``out = relu(q) @ (relu(k)^T v) / (relu(q) . sum_n relu(k) + eps)``: the official "pad V with
    a row of ones" result without materialising a padded V; the key sum rides along as one extra
    column of the small (d, d) key-value matrix, so one product yields numerator and normaliser.
    ``K^T V`` and the key sum accumulate in fp32; the last product runs in fp32, except for bf16
    inputs (see ``_attention_product_dtype``); the division writes the (B, N, C) result in v's
    dtype directly. Returns (B, N, C).
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _relu_linear_attention_differentiable(q, k, v, heads)
    B, N, C = q.shape
    d = C // heads
    by_head = (B, heads, N, d)
    k_h = torch.clamp_min(_split_heads(k, heads), 0, out=k.new_empty(by_head))  # relu(K), (B, h, N, d)
    v_h = _split_heads(v, heads).contiguous()  # (B, h, N, d)
    kv = torch.cat([_matmul_fp32(k_h.mT, v_h), k_h.sum(dim=2, dtype=torch.float32).unsqueeze(-1)], dim=-1)
    product_dtype = _attention_product_dtype(v.dtype)
    q_h = q.new_empty(by_head, dtype=product_dtype)
    torch.maximum(_split_heads(q, heads), q_h.new_zeros(1), out=q_h)  # relu(Q), cast and laid out in one pass
    out = q_h @ kv.to(product_dtype)  # (B, h, N, d + 1): numerator | normaliser
    ratio = (out[..., :d], out[..., d:] + LINEAR_ATTENTION_EPS)
    if torch.compiler.is_compiling():  # dynamo refuses strided out=; inductor fuses this chain anyway
        return (ratio[0] / ratio[1]).transpose(1, 2).reshape(B, N, C).to(v.dtype)
    result = v.new_empty(B, N, C)
    torch.div(*ratio, out=_split_heads(result, heads))  # eager: divide, cast and re-lay out in one pass
    return result


def _relu_linear_attention_differentiable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                          heads: int) -> torch.Tensor:
    """``relu_linear_attention`` without ``out=`` writes, which autograd refuses (LoRA training):
    the same products, dtypes and eps. (B, N, C) each -> (B, N, C)."""
    B, N, C = q.shape
    d = C // heads
    k_h = torch.relu(_split_heads(k, heads))
    kv = torch.cat([_matmul_fp32(k_h.mT, _split_heads(v, heads)),
                    k_h.sum(dim=2, dtype=torch.float32).unsqueeze(-1)], dim=-1)
    product_dtype = _attention_product_dtype(v.dtype)
    out = torch.relu(_split_heads(q, heads)).to(product_dtype) @ kv.to(product_dtype)
    return (out[..., :d] / (out[..., d:] + LINEAR_ATTENTION_EPS)).transpose(1, 2).reshape(B, N, C).to(v.dtype)


def _attention_product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The official code upcasts linear attention to fp32 for its fp16 releases (``fp32_attention``,
    which also keeps fp16 finite) and runs it in the autocast dtype for its bf16 releases; following
    it keeps bf16 models on the tensor cores and halves the attention's memory traffic."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, h, N, C / h) view."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)


_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # bf16/fp16 inputs, fp32 result (CUDA, torch >= 2.8)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32; (..., M, K) @ (..., K, N), batch dims merge as views."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _BMM_OUT_DTYPE:
        batch = a.shape[:-2]
        a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        product = torch.bmm(a3, b3, out_dtype=torch.float32)
        return product.view(*batch, *product.shape[-2:])
    return a.float() @ b.float()


def text_mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) keep-mask (bool or 0/1 float) -> (B, 1, 1, L) additive bias: 0 keep, -10000 pad."""
    return ((1 - mask.to(dtype)) * MASK_BIAS)[:, None, None, :]


def batch_timesteps(timesteps: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) timestep -> (B,) float32 on ``device``."""
    return torch.as_tensor(timesteps, device=device).float().reshape(-1).expand(batch)


def adaln_modulation(t_block: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """adaLN-single: (..., C) embedded timestep -> (..., 6, 1, C) modulation shared by all blocks, with
    the "1 +" of both scales added here once instead of in every block. The leading dims are (B,), or
    (B, Ft) for SANA-Video, whose latent frames may run at their own timesteps."""
    lead, channels = t.shape[:-1], t.shape[-1]
    t0 = t_block(t).view(*lead, 2, 3, 1, channels)
    t0[..., 1, :, :] += 1  # rows 1 and 4: scale_msa, scale_mlp
    return t0.view(*lead, 6, 1, channels)


def embed_caption(y_embedder: nn.Module, y_norm: nn.Module, context: torch.Tensor, context_mask: torch.Tensor | None,
                  dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Caption projection + y-norm, and the text mask as an additive bias: context (B, L, caption_channels),
    context_mask (B, L) or None -> (B, L, C) caption, (B, 1, 1, L) bias on ``device`` or None."""
    y = y_norm(y_embedder(context.to(dtype)))
    mask_bias = None if context_mask is None else text_mask_to_bias(context_mask.to(device), dtype)
    return y, mask_bias


def control_residuals(control: dict | None, tokens_shape: torch.Size) -> list | None:
    """The per-block residuals of a Sana ControlNet from ComfyUI's control dict, checked against the
    (B, N, C) tokens: a ControlNet of another family (UNet feature maps, Flux tokens, another width)
    is refused in words instead of failing on a shape inside a block."""
    if not control:
        return None
    foreign = [key for key, values in control.items() if key != "input" and any(v is not None for v in values)]
    residuals = control.get("input") or []
    bad = next((tuple(r.shape) for r in residuals if r is not None and tuple(r.shape) != tuple(tokens_shape)), None)
    if foreign or bad is not None:
        found = f"'{foreign[0]}' residuals" if foreign else f"residuals of shape {list(bad)}"
        raise ValueError(
            f"Sana: the applied ControlNet gives {found}, but this Sana model needs residuals of shape "
            f"{list(tokens_shape)} (batch, tokens, width); it is a ControlNet for another model family or "
            "another Sana size. Load a Sana ControlNet of this model's size with 'Load Sana ControlNet (Velox)'.")
    return residuals


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm (no affine) then x * (1 + scale) + shift; shift, 1 + scale: (B, 1, C)."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), scale_plus_one)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class _ConvSlot(nn.Module):
    """Holds ``.conv`` so that parameter names read ``mlp.inverted_conv.conv.weight``."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv


class PatchEmbed(nn.Module):
    """x_embedder: Conv2d(in, C, k=p, s=p); (B, in, H, W) -> (B, N, C) tokens, row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True,
                                      device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels_last input makes the conv emit channels_last, whose (B, C, N) view transposes
        # to contiguous (B, N, C) for free.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return x.flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """t_embedder / cfg_embedder: sinusoid(256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            operations.Linear(frequency_dim, hidden_size, bias=True, device=device, dtype=dtype),
            nn.SiLU(),
            operations.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t: (B,) float -> (B, C) in ``dtype``."""
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(dtype))


class CaptionProjection(nn.Module):
    """y_embedder.y_proj: timm Mlp(caption_channels -> C -> C) with tanh-GELU."""

    def __init__(self, caption_channels: int, hidden_size: int, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.fc1 = operations.Linear(caption_channels, hidden_size, bias=True, device=device, dtype=dtype)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = operations.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(y)))


class CaptionEmbedder(nn.Module):
    """y_embedder (its null-caption buffer ``y_embedding`` is training-only and not kept)."""

    def __init__(self, caption_channels: int, hidden_size: int, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.y_proj = CaptionProjection(caption_channels, hidden_size, device, dtype, operations)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


def adaln_single_projection(hidden_size: int, device=None, dtype=None, operations=DEFAULT_OPERATIONS) -> nn.Sequential:
    """t_block: SiLU -> Linear(C, 6C), the adaLN-single projection every block's modulation comes from."""
    return nn.Sequential(
        nn.SiLU(), operations.Linear(hidden_size, 6 * hidden_size, bias=True, device=device, dtype=dtype))


def caption_norm(hidden_size: int, device=None, dtype=None, operations=DEFAULT_OPERATIONS) -> nn.Module:
    """attention_y_norm: the RMSNorm over the projected caption."""
    return operations.RMSNorm(hidden_size, eps=1e-5, device=device, dtype=dtype)


def _qk_norms(enabled: bool, hidden_size: int, device, dtype, operations) -> tuple:
    """Sana 1.5 / Sprint q and k RMSNorms across all heads (diffusers: rms_norm_across_heads)."""
    if not enabled:
        return None, None
    return tuple(operations.RMSNorm(hidden_size, eps=1e-5, device=device, dtype=dtype) for _ in range(2))


class LinearAttention(nn.Module):
    """LiteLA: qkv Linear (no bias), optional RMS q/k norm across heads, ReLU linear attention."""

    def __init__(self, hidden_size: int, head_dim: int, qk_norm: bool, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.heads = hidden_size // head_dim
        self.qkv = operations.Linear(hidden_size, 3 * hidden_size, bias=False, device=device, dtype=dtype)
        self.q_norm, self.k_norm = _qk_norms(qk_norm, hidden_size, device, dtype, operations)
        self.proj = operations.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, replace=None, extra_options: dict | None = None) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C). ``replace(q, k, v, extra_options)`` may stand in for the
        attention itself (PAG's identity branch returns ``v``); it gets (B, N, C) projections."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if replace is None:
            out = relu_linear_attention(q, k, v, self.heads)
        else:
            out = replace(q, k, v, {**(extra_options or {}), "heads": self.heads})
        out = self.proj(out)
        if out.dtype == torch.float16:  # as upstream: keep fp16 releases finite
            out = out.clip(-65504, 65504)
        return out


class CrossAttention(nn.Module):
    """MultiHeadCrossAttention: softmax attention from image tokens to caption tokens (SDPA)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.heads = num_heads
        self.q_linear = operations.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype)
        self.kv_linear = operations.Linear(hidden_size, 2 * hidden_size, bias=True, device=device,
                                           dtype=dtype)
        self.q_norm, self.k_norm = _qk_norms(qk_norm, hidden_size, device, dtype, operations)
        self.proj = operations.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, C) image tokens, y: (B, L, C) caption tokens, mask_bias: (B, 1, 1, L) or None."""
        B, N, C = x.shape
        d = C // self.heads
        q = self.q_linear(x)
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, N, self.heads, d).transpose(1, 2)
        k = k.view(B, -1, self.heads, d).transpose(1, 2)
        v = v.view(B, -1, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class GLUMBConv(nn.Module):
    """Mix-FFN: 1x1 (Linear) C->2F + SiLU, 3x3 depthwise on 2F, GLU (x * SiLU(gate)), 1x1 F->C."""

    def __init__(self, hidden_size: int, mlp_ratio: float, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.inverted_conv = _ConvSlot(
            operations.Linear(hidden_size, 2 * inner, bias=True, device=device, dtype=dtype))
        self.depth_conv = _ConvSlot(operations.Conv2d(
            2 * inner, 2 * inner, 3, padding=1, groups=2 * inner, bias=True, device=device, dtype=dtype))
        self.point_conv = _ConvSlot(
            operations.Linear(inner, hidden_size, bias=False, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x: (B, N, C) with N = height * width -> (B, N, C)."""
        B, N, _ = x.shape
        h = F.silu(self.inverted_conv.conv(x))  # (B, N, 2F)
        # (B, H, W, 2F) permuted to (B, 2F, H, W) is a channels_last view: no copy.
        h = self.depth_conv.conv(h.view(B, height, width, -1).permute(0, 3, 1, 2))
        h = h.permute(0, 2, 3, 1)  # back to (B, H, W, 2F), contiguous when the conv kept channels_last
        value, gate = h.chunk(2, dim=-1)
        return self.point_conv.conv((value * F.silu(gate)).reshape(B, N, -1))


class SanaBlock(nn.Module):
    """SanaMSBlock: adaLN-single linear self-attention, cross-attention, GLUMBConv."""

    def __init__(self, hidden_size: int, num_heads: int, linear_head_dim: int, mlp_ratio: float,
                 qk_norm: bool, norm_eps: float = 1e-6, device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.norm_eps = norm_eps
        self.scale_shift_table = nn.Parameter(torch.empty(6, hidden_size, device=device, dtype=dtype))
        self.attn = LinearAttention(hidden_size, linear_head_dim, qk_norm, device, dtype, operations)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm, device, dtype, operations)
        self.mlp = GLUMBConv(hidden_size, mlp_ratio, device, dtype, operations)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, mask_bias: torch.Tensor | None,
                height: int, width: int, attn_replace=None,
                extra_options: dict | None = None) -> torch.Tensor:
        """x: (B, N, C); y: (B, L, C); t0: (B, 6, 1, C) from t_block with 1 already added to its
        two scale rows (``SanaTransformer.adaln_single``); returns (B, N, C)."""
        modulation = _cast(self.scale_shift_table, x)[:, None, :] + t0  # (B, 6, 1, C)
        # the two scales arrive as 1 + scale
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.unbind(1)
        # 1. linear self-attention
        attn = self.attn(_modulate(x, shift_msa, scale_msa, self.norm_eps), attn_replace, extra_options)
        x = torch.addcmul(x, gate_msa, attn)
        # 2. cross-attention to the caption (no norm, no gate)
        x = x + self.cross_attn(x, y, mask_bias)
        # 3. Mix-FFN
        ffn = self.mlp(_modulate(x, shift_mlp, scale_mlp, self.norm_eps), height, width)
        return torch.addcmul(x, gate_mlp, ffn)


class FinalLayer(nn.Module):
    """T2IFinalLayer: adaLN (shift, scale from its table + t) then Linear(C, p*p*out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_eps: float = 1e-6,
                 device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.norm_eps = norm_eps
        self.scale_shift_table = nn.Parameter(torch.empty(2, hidden_size, device=device, dtype=dtype))
        self.linear = operations.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True,
                                        device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C), t: (B, C) embedded timestep -> (B, N, p*p*out)."""
        shift, scale = (_cast(self.scale_shift_table, x)[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(_modulate(x, shift, 1 + scale, self.norm_eps))


class SanaTransformer(nn.Module):
    """Sana DiT (SanaMS, and SanaMSCM's network for Sprint) with official module names."""

    def __init__(
        self,
        hidden_size: int = 2240,
        depth: int = 20,
        num_heads: int = 20,
        linear_head_dim: int = 32,
        in_channels: int = 32,
        out_channels: int = 32,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        patch_size: int = 1,
        qk_norm: bool = False,
        use_pe: bool = False,
        sample_size: int = 32,
        pe_interpolation: float = 1.0,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        timestep_norm_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        operations: Any = None,
        **kwargs: Any,  # ComfyUI's unet_config extras and SanaConfig's sampling fields
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype, operations=DEFAULT_OPERATIONS if operations is None else operations)
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.use_pe = use_pe
        self.base_size = sample_size // patch_size
        self.pe_interpolation = pe_interpolation
        self.guidance_embeds_scale = guidance_embeds_scale
        self.timestep_norm_scale = timestep_norm_scale

        # 1. embeddings
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, **factory)
        self.t_embedder = TimestepEmbedder(hidden_size, **factory)
        self.cfg_embedder = TimestepEmbedder(hidden_size, **factory) if guidance_embeds else None
        self.t_block = adaln_single_projection(hidden_size, **factory)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, **factory)
        self.attention_y_norm = caption_norm(hidden_size, **factory)
        # 2. blocks
        self.blocks = nn.ModuleList(
            SanaBlock(hidden_size, num_heads, linear_head_dim, mlp_ratio, qk_norm, **factory)
            for _ in range(depth)
        )
        # 3. output
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, **factory)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | float | None = None,
        transformer_options: dict | None = None,
        control: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: (B, in_channels, H, W) latent; timesteps: (B,) float sigma * 1000 (fractional, not
        truncated; Sprint models divide by ``timestep_norm_scale`` internally); context:
        (B, L, caption_channels) Gemma features; context_mask: (B, L) 1 keep / 0 pad, bool or
        float; guidance: (B,) or float, the raw guidance scale for Sprint (scaled by
        ``guidance_embeds_scale`` here; 4.5 when omitted); control: ComfyUI's ControlNet output, whose
        ``control["input"][k]`` (B, N, C) is added to the output of block k + 1 (diffusers'
        ``controlnet_block_samples`` order). Returns (B, out_channels, H, W).
        """
        options = transformer_options or {}
        B, _, H, W = x.shape
        height, width = H // self.patch_size, W // self.patch_size
        dtype = x.dtype

        # 1. patch embedding (+ sincos PE computed for this H, W)
        tokens = self.x_embedder(x)  # (B, N, C)
        if self.use_pe:
            pe = sincos_pos_embed_2d(self.hidden_size, height, width, self.base_size, self.pe_interpolation,
                                     x.device)
            tokens = tokens + pe.to(dtype)

        # 2. timestep (+ Sprint guidance) embedding, adaLN-single
        t = self.t_embedder(self._timesteps(timesteps, B, x.device), dtype)  # (B, C)
        if self.cfg_embedder is not None:
            t = t + self.cfg_embedder(self._guidance(guidance, B, x.device), dtype)
        t0 = self.adaln_single(t)  # (B, 6, 1, C)

        # 3. caption projection + y-norm, text mask as an additive bias
        y, mask_bias = embed_caption(self.y_embedder, self.attention_y_norm, context, context_mask, dtype, x.device)

        # 4. blocks
        residuals = control_residuals(control, tokens.shape)
        tokens = self._run_blocks(tokens, y, t0, mask_bias, height, width, options, residuals)

        # 5. final layer, unpatchify
        out = self.final_layer(tokens, t)  # (B, N, p*p*out)
        return self._unpatchify(out, B, height, width)

    def adaln_single(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C) embedded timestep -> (B, 6, 1, C) modulation shared by all blocks (``adaln_modulation``)."""
        return adaln_modulation(self.t_block, t)

    def _timesteps(self, timesteps: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        t = batch_timesteps(timesteps, batch, device)
        return t if self.timestep_norm_scale == 1.0 else t / self.timestep_norm_scale

    def _guidance(self, guidance: torch.Tensor | float | None, batch: int,
                  device: torch.device) -> torch.Tensor:
        if guidance is None or not torch.is_tensor(guidance):
            value = SPRINT_DEFAULT_GUIDANCE if guidance is None else float(guidance)
            return torch.full((batch,), value * self.guidance_embeds_scale, device=device)
        return guidance.to(device).float().reshape(-1).expand(batch) * self.guidance_embeds_scale

    def _run_blocks(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, mask_bias: torch.Tensor | None,
                    height: int, width: int, options: dict, residuals: list | None = None) -> torch.Tensor:
        """ComfyUI hooks: ``patches_replace["dit"][("double_block", i)]`` replaces a whole block,
        ``patches_replace["attn1"][("sana_block", i)]`` replaces block i's linear attention."""
        patches = options.get("patches_replace", {})
        blocks_replace = patches.get("dit", {})
        attn_replace = patches.get("attn1", {})
        for i, block in enumerate(self.blocks):
            extra = {"block_index": i, "transformer_options": options}
            replace = attn_replace.get(("sana_block", i))
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block, replace=replace, extra=extra):
                    img = block(args["img"], args["txt"], args["vec"], args["txt_mask"], height, width,
                                replace, extra)
                    return {"img": img}

                x = blocks_replace[("double_block", i)](
                    {"img": x, "txt": y, "vec": t0, "txt_mask": mask_bias, "transformer_options": options},
                    {"original_block": block_wrap},
                )["img"]
            else:
                x = block(x, y, t0, mask_bias, height, width, replace, extra)
            if residuals and 0 < i <= len(residuals) and residuals[i - 1] is not None:
                x = x + residuals[i - 1].to(x.dtype)
        return x

    def _unpatchify(self, x: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        """(B, N, p*p*out) -> (B, out, H*p, W*p), contiguous."""
        p = self.patch_size
        x = x.view(batch, height, width, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, self.out_channels, height * p, width * p)

    @classmethod
    def from_config(cls, config: SanaConfig, device=None, dtype=None, operations=None) -> SanaTransformer:
        """Build (uninitialised) from a ``SanaConfig``."""
        return cls(**config.model_kwargs(), device=device, dtype=dtype, operations=operations)

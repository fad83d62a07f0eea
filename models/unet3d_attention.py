"""Spatial and temporal transformers of the VideoCrafter / DynamiCrafter 3D UNet, pure PyTorch.

Upstream: ``lvdm/modules/attention.py`` of AILab-CVC/VideoCrafter and Doubiiu/DynamiCrafter. Module
names equal lvdm's (``attn1``, ``attn2.to_k_ip``, ``relative_position_k.embeddings_table`` ...), so a
checkpoint's ``model.diffusion_model.*`` keys load as is.

Attention runs through an ``attention(q, k, v, heads, mask=None)`` callable on (B, N, heads*d) tensors,
the signature of ComfyUI's ``optimized_attention``; the default is ``scaled_dot_product_attention``, so
no attention matrix is materialized. The one exception is VideoCrafter 1's relative positions: they
add ``q . table_k[i - j]`` to the logits and ``softmax . table_v[i - j]`` to the output, which needs
the (frames x frames) probabilities; those are explicit, and only over frames (16 x 16 per pixel).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

AttentionFn = Callable[..., torch.Tensor]
DEFAULT_OPERATIONS = SimpleNamespace(
    Linear=nn.Linear, Conv1d=nn.Conv1d, Conv2d=nn.Conv2d, Conv3d=nn.Conv3d, GroupNorm=nn.GroupNorm,
    LayerNorm=nn.LayerNorm,
)
TEXT_CONTEXT_LEN = 77  # lvdm CrossAttention.text_context_len: tokens after it are image tokens
GROUPS = 32  # every GroupNorm in the UNet
SDPA_BATCH_LIMIT = 2**15
TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm eps of Spatial/TemporalTransformer (ResBlocks use 1e-5)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Multi-head attention on (B, N, heads*d) tensors through SDPA; returns (B, Nq, heads*d).

    Temporal layers have B = batch * H * W (18 432 at 576x1024, batch 2); CUDA SDPA kernels fail on
    batches above 2**15 (as ComfyUI's attention_pytorch notes), so larger batches go in chunks.
    """
    b, nq, inner = q.shape
    if b > SDPA_BATCH_LIMIT:
        return torch.cat([sdpa_attention(q[i:i + SDPA_BATCH_LIMIT], k[i:i + SDPA_BATCH_LIMIT],
                                         v[i:i + SDPA_BATCH_LIMIT], heads, mask, is_causal)
                          for i in range(0, b, SDPA_BATCH_LIMIT)])
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return out.transpose(1, 2).reshape(b, nq, inner)


def attention_with_relative_positions(q, k, v, heads, table_k, table_v, causal: bool = False):
    """lvdm's relative-position attention (VideoCrafter 1 temporal layers), explicit over frames.

    q, k, v: (B, T, heads*d); table_k, table_v: (T, T, d) embeddings of the clipped offset j - i.
    logits = (q.k + q.table_k) / sqrt(d); out = p.v + p.table_v.
    """
    b, t, inner = q.shape
    d = inner // heads
    q, k, v = (x.view(b, t, heads, d).transpose(1, 2) for x in (q, k, v))  # B h T d
    scale = d ** -0.5
    sim = (q @ k.transpose(-1, -2)) * scale
    sim = sim + torch.einsum("bhtd,tsd->bhts", q, table_k) * scale
    if causal:
        keep = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        sim = sim.masked_fill(~keep, -torch.finfo(sim.dtype).max)
    p = sim.softmax(dim=-1)
    out = p @ v + torch.einsum("bhts,tsd->bhtd", p, table_v)
    return out.transpose(1, 2).reshape(b, t, inner)


class RelativePosition(nn.Module):
    """Learned embedding per clipped frame offset: ``embeddings_table`` (2*max_rel + 1, d_head)."""

    def __init__(self, num_units: int, max_relative_position: int, device=None, dtype=None):
        super().__init__()
        self.max_relative_position = max_relative_position
        self.embeddings_table = nn.Parameter(
            torch.empty(max_relative_position * 2 + 1, num_units, device=device, dtype=dtype))

    def forward(self, length_q: int, length_k: int, dtype: torch.dtype) -> torch.Tensor:
        device = self.embeddings_table.device
        offsets = torch.arange(length_k, device=device)[None, :] - torch.arange(length_q, device=device)[:, None]
        index = offsets.clamp(-self.max_relative_position, self.max_relative_position) + self.max_relative_position
        return self.embeddings_table.to(dtype)[index]


class CrossAttention(nn.Module):
    """lvdm CrossAttention: self- or text cross-attention, plus optional image-token cross-attention.

    With ``image_cross_attention`` the context is [text (77 tokens), image tokens]: the image tokens
    get their own ``to_k_ip``/``to_v_ip`` and their attention output is added with weight
    ``image_scale`` (x ``tanh(alpha) + 1`` when the scale is learnable, DynamiCrafter 256).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 relative_position: bool = False, temporal_length: int | None = None,
                 image_cross_attention: bool = False, image_scale_learnable: bool = False,
                 causal: bool = False, attention: AttentionFn | None = None,
                 device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        inner = dim_head * heads
        context_dim = context_dim or query_dim
        self.heads = heads
        self.causal = causal
        self.attention = attention or sdpa_attention
        self.image_cross_attention = image_cross_attention
        self.image_scale_learnable = image_scale_learnable
        self.image_scale = 1.0  # lvdm image_cross_attention_scale, 1.0 in every config
        linear = operations.Linear
        self.to_q = linear(query_dim, inner, bias=False, device=device, dtype=dtype)
        self.to_k = linear(context_dim, inner, bias=False, device=device, dtype=dtype)
        self.to_v = linear(context_dim, inner, bias=False, device=device, dtype=dtype)
        self.to_out = nn.Sequential(linear(inner, query_dim, device=device, dtype=dtype), nn.Dropout(0.0))
        self.relative_position = relative_position
        if relative_position:
            self.relative_position_k = RelativePosition(dim_head, temporal_length, device=device, dtype=dtype)
            self.relative_position_v = RelativePosition(dim_head, temporal_length, device=device, dtype=dtype)
        if image_cross_attention:
            self.to_k_ip = linear(context_dim, inner, bias=False, device=device, dtype=dtype)
            self.to_v_ip = linear(context_dim, inner, bias=False, device=device, dtype=dtype)
            if image_scale_learnable:
                self.alpha = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim); context: (B, L, context_dim) or None for self-attention."""
        q = self.to_q(x)
        if context is None:
            out = self._attend(q, self.to_k(x), self.to_v(x))
            return self.to_out(out)
        text = context[:, :TEXT_CONTEXT_LEN] if self.image_cross_attention else context
        out = self._attend(q, self.to_k(text), self.to_v(text))
        if self.image_cross_attention:
            image = context[:, TEXT_CONTEXT_LEN:]
            out = out + self._image_weight(out.dtype) * self.attention(
                q, self.to_k_ip(image), self.to_v_ip(image), self.heads)
        return self.to_out(out)

    def _attend(self, q, k, v):
        if self.relative_position:
            t = q.shape[1]
            table_k = self.relative_position_k(t, t, q.dtype)
            table_v = self.relative_position_v(t, t, q.dtype)
            return attention_with_relative_positions(q, k, v, self.heads, table_k, table_v, self.causal)
        if self.causal:
            return sdpa_attention(q, k, v, self.heads, is_causal=True)
        return self.attention(q, k, v, self.heads)

    def _image_weight(self, dtype):
        if self.image_scale_learnable:
            return self.image_scale * (torch.tanh(self.alpha.to(dtype)) + 1)
        return self.image_scale


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, inner width 4*dim: ``net.0.proj`` (dim -> 8*dim), ``net.2`` (4*dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4, device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner, device=device, dtype=dtype, operations=operations),
            nn.Dropout(0.0),
            operations.Linear(inner, dim, device=device, dtype=dtype),
        )

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (``attn1``), cross-attention (``attn2``), GEGLU FF, each residual.

    Temporal blocks have no text context: their ``attn2`` is a second self-attention.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None,
                 attention_kwargs: dict | None = None, cross_kwargs: dict | None = None,
                 device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        common = dict(heads=heads, dim_head=dim_head, device=device, dtype=dtype, operations=operations,
                      **(attention_kwargs or {}))
        self.attn1 = CrossAttention(dim, **common)
        self.ff = FeedForward(dim, device=device, dtype=dtype, operations=operations)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, **common, **(cross_kwargs or {}))
        self.norm1 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.norm2 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.norm3 = operations.LayerNorm(dim, device=device, dtype=dtype)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the h*w tokens of a (B*T, C, H, W) map (``use_linear`` projections).

    Context: (B*T, L, context_dim), text tokens then optional image tokens.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 image_cross_attention: bool = False, image_scale_learnable: bool = False,
                 attention: AttentionFn | None = None, device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        inner = heads * dim_head
        self.norm = operations.GroupNorm(GROUPS, channels, eps=TRANSFORMER_NORM_EPS, device=device, dtype=dtype)
        self.proj_in = operations.Linear(channels, inner, device=device, dtype=dtype)
        cross = dict(image_cross_attention=image_cross_attention, image_scale_learnable=image_scale_learnable)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dict(attention=attention), cross,
                                  device=device, dtype=dtype, operations=operations)
            for _ in range(depth)
        ])
        self.proj_out = operations.Linear(inner, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        bt, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B*T, H*W, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        tokens = self.proj_out(tokens)
        return tokens.transpose(1, 2).reshape(bt, c, h, w) + x


class TemporalTransformer(nn.Module):
    """Per-pixel transformer over the frames of a (B, C, T, H, W) map; self-attention only.

    VideoCrafter 1 adds relative positions (tables of 2*temporal_length + 1 rows); a causal mask is
    optional (no released config enables it). ``use_linear=False`` (lvdm's ``init_attn``, built
    without the flag) makes ``proj_in``/``proj_out`` 1x1 Conv1d layers, (out, in, 1) weights.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int,
                 relative_position: bool = False, temporal_length: int | None = None, causal: bool = False,
                 use_linear: bool = True, attention: AttentionFn | None = None,
                 device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = operations.GroupNorm(GROUPS, channels, eps=TRANSFORMER_NORM_EPS, device=device, dtype=dtype)
        self.proj_in = self._projection(channels, inner, device, dtype, operations)
        kwargs = dict(relative_position=relative_position, temporal_length=temporal_length,
                      causal=causal, attention=attention)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, None, kwargs, device=device, dtype=dtype,
                                  operations=operations)
            for _ in range(depth)
        ])
        self.proj_out = self._projection(inner, channels, device, dtype, operations)

    def _projection(self, dim_in, dim_out, device, dtype, operations):
        if self.use_linear:
            return operations.Linear(dim_in, dim_out, device=device, dtype=dtype)
        return operations.Conv1d(dim_in, dim_out, 1, device=device, dtype=dtype)

    def _project(self, layer, tokens):
        return layer(tokens) if self.use_linear else layer(tokens.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (B*H*W, T, C)
        tokens = self._project(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = self._project(self.proj_out, tokens)
        return tokens.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2) + x

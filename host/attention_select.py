"""The loaders' ``attention`` choice, through ComfyUI's own hook, never a global patch.

Core's attention functions are wrapped by ``comfy.ldm.modules.attention.wrap_attn``: when a model's
``transformer_options`` hold ``optimized_attention_override``, every attention call of that model
goes to it as ``override(func, q, k, v, heads, mask=None, ..., skip_reshape, skip_output_reshape)``,
with ``func`` the attention core picked. The override lives in the patcher's ``model_options``, so it
follows clones and reaches only the model it was set on. Velox's own VideoCrafter UNet takes its
attention as a constructor callable (core's ``optimized_attention``, called without
``transformer_options``), so there the same override is bound into that model's attention modules.

| choice | what runs |
|---|---|
| auto | 8bit when the weights compute in 8 bits (``quant_compute`` lowp), else what core picked |
| sdpa | PyTorch's scaled_dot_product_attention (core's ``attention_pytorch``) |
| fa3 | FlashAttention-3 (the optional ``fa3-fwd`` wheel, Hopper only); else core's, with a warning |
| 8bit | INT8 Q.Kᵀ, FP8 P.V (``kernels/attention_8bit.py``; accurate mode below FP8 GPUs) |
| 8bit-accurate | INT8 Q.Kᵀ, 16-bit P.V (also Ampere) |

Masked attention and head widths the 8-bit kernel lacks go to ``func`` unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from comfy_api.latest import io

from ..kernels.attention_8bit import HEAD_DIMS, attention

LOG = logging.getLogger(__name__)
ATTENTION_CHOICES = ("auto", "sdpa", "fa3", "8bit", "8bit-accurate")
HOPPER = (9, 0)


def attention_input():
    """The optional ``attention`` input every transformer loader ends with (old workflows: auto)."""
    return io.Combo.Input(
        "attention", options=list(ATTENTION_CHOICES), default="auto", optional=True,
        tooltip="Attention kernel. auto: 8bit when quant_compute is lowp, else ComfyUI's choice. sdpa: PyTorch "
        "SDPA. fa3: FlashAttention-3 (fa3-fwd wheel, Hopper GPUs; otherwise ComfyUI's choice). 8bit: INT8 Q.K "
        "and FP8 P.V (fastest, about 4e-2 error). 8bit-accurate: INT8 Q.K, 16-bit P.V (about 1.5e-2, any "
        "recent GPU). Masked attention always uses ComfyUI's choice.")


def _heads_first(q, k, v, heads: int, skip_reshape: bool):
    """(B, L, H·D) -> (B, H, L, D), as core's attention functions do."""
    if skip_reshape:
        return q, k, v
    b, _, inner = q.shape
    return tuple(t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))


def _tokens_first(out: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return out
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def _run_heads_first(kernel, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                     skip_output_reshape=False, **kwargs):
    """Call ``kernel(q, k, v)`` on (B, H, L, D) tensors where it applies, else core's ``func``."""
    qh, kh, vh = _heads_first(q, k, v, heads, skip_reshape)
    usable = mask is None and qh.shape[-1] in HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16)
    if not usable:
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)
    return _tokens_first(kernel(qh, kh, vh), skip_output_reshape)


def _sdpa(func, *args, **kwargs):
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)  # kwargs carry _inside_attn_wrapper: no second override


# PyPI's fa3-fwd wheel ships ``fa3_fwd_interface``; FlashAttention's own hopper/ build ``flash_attn_interface``
FA3_MODULES = ("fa3_fwd_interface", "flash_attn_interface")


def _fa3_module() -> str | None:
    return next((name for name in FA3_MODULES if importlib.util.find_spec(name) is not None), None)


def fa3_attention(q, k, v):
    flash_attn_func = importlib.import_module(_fa3_module()).flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def fa3_available() -> str | None:
    """None when FA3 can run here, else why not."""
    if _fa3_module() is None:
        return "the fa3-fwd wheel (fa3_fwd_interface) is not installed"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != HOPPER[0]:
        return "FlashAttention-3 runs on Hopper GPUs (compute capability 9.x) only"
    return None


OVERRIDES = {
    "sdpa": _sdpa,
    "fa3": functools.partial(_run_heads_first, fa3_attention),
    "8bit": functools.partial(_run_heads_first, functools.partial(attention, accurate=False)),
    "8bit-accurate": functools.partial(_run_heads_first, functools.partial(attention, accurate=True)),
}


def resolve_attention(choice: str, lowp: bool) -> str | None:
    """The override to install for a loader's choice (None: core's own attention)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention {choice!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "auto":
        return "8bit" if lowp else None
    if choice == "fa3" and (why := fa3_available()):
        LOG.warning("Velox: attention 'fa3' unavailable (%s); using ComfyUI's attention", why)
        return None
    return choice


def apply_attention_choice(patcher, choice: str, lowp: bool = False):
    """Install the chosen attention on ``patcher`` (in place; returns it)."""
    resolved = resolve_attention(choice, lowp)
    if resolved is None:
        return patcher
    options = patcher.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = OVERRIDES[resolved]
    _bind_into_own_modules(patcher.model, OVERRIDES[resolved])
    return patcher


def _bind_into_own_modules(model: torch.nn.Module, override) -> None:
    from comfy.ldm.modules.attention import optimized_attention

    from ..models.unet3d_attention import CrossAttention

    routed = functools.partial(override, optimized_attention)
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.attention = routed

"""Backward formulas for comfy-kitchen ops that core's models call and training differentiates.

ComfyUI 0.8.0 computes Wan's RoPE with ``torch.ops.comfy_kitchen.apply_rope1``, a custom op registered
without an autograd formula, so a LoRA step through core's Wan fails ("Trying to backward through
comfy_kitchen.apply_rope1"). RoPE rotates each (2k, 2k+1) pair by a fixed 2x2 matrix, so its backward
is the same op with the matrices transposed. The formula is added through torch's own
``torch.library.register_autograd`` (additive: the forward and every inference path are untouched),
once, and only where the op exists (core 0.3.75 has no kitchen: nothing to do).
"""

from __future__ import annotations

import torch

_REGISTERED: set[str] = set()


def _rope_setup_context(ctx, inputs, output) -> None:
    _, freqs_cis = inputs
    ctx.freqs_t = freqs_cis.transpose(-1, -2).contiguous()


def _rope_backward(ctx, grad):
    """x_out = M x per pair with M = freqs_cis[..., :, :] (columns f0, f1): dx = M^T dout."""
    return torch.ops.comfy_kitchen.apply_rope1(grad.contiguous(), ctx.freqs_t), None


def enable_kitchen_autograd() -> list[str]:
    """Register the missing backward formulas; returns the ops this call registered."""
    namespace = getattr(torch.ops, "comfy_kitchen", None)
    if namespace is None or "apply_rope1" in _REGISTERED:
        return []
    try:
        namespace.apply_rope1  # noqa: B018 (resolves the op; absent when comfy-kitchen is not imported)
    except (AttributeError, RuntimeError):
        return []
    torch.library.register_autograd("comfy_kitchen::apply_rope1", _rope_backward, setup_context=_rope_setup_context)
    _REGISTERED.add("apply_rope1")
    return ["apply_rope1"]

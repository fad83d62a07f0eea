"""The backward formula Velox registers for comfy-kitchen's RoPE (core 0.8.0's Wan calls it): gradients
equal those of core's own PyTorch RoPE formula."""

from __future__ import annotations

import pytest
import torch


def torch_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """core's fallback ``apply_rope1`` (comfy/ldm/flux/math.py)."""
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    x_out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return x_out.reshape(*x.shape).type_as(x)


def test_kitchen_rope_backward_equals_the_torch_formula():
    kitchen = pytest.importorskip("comfy_kitchen")
    from velox.host.kitchen_autograd import enable_kitchen_autograd

    enable_kitchen_autograd()
    enable_kitchen_autograd()  # idempotent
    generator = torch.Generator().manual_seed(0)
    angles = torch.randn(1, 6, 1, 8, generator=generator)
    freqs = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], -1)
    freqs = freqs.reshape(1, 6, 1, 8, 2, 2)
    x = torch.randn(1, 6, 2, 16, generator=generator, requires_grad=True)
    upstream = torch.randn(1, 6, 2, 16, generator=generator)
    (kitchen.apply_rope1(x, freqs) * upstream).sum().backward()
    got, x.grad = x.grad.clone(), None
    (torch_rope1(x, freqs) * upstream).sum().backward()
    assert torch.allclose(got, x.grad, atol=1e-5)


def test_nothing_is_registered_without_comfy_kitchen(monkeypatch):
    from velox.host import kitchen_autograd

    monkeypatch.setattr(kitchen_autograd, "_REGISTERED", set())
    if hasattr(torch.ops, "comfy_kitchen"):
        pytest.skip("comfy-kitchen is loaded in this environment")
    assert kitchen_autograd.enable_kitchen_autograd() == []

"""The loaders' ``attention`` choice: through core's ``optimized_attention_override`` hook only, the
8-bit kernels equal core's SDPA within their tolerances, and masked calls are left to core."""

from __future__ import annotations

import logging

import pytest
import torch


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def qkv(batch=1, heads=2, lq=40, lk=52, head_dim=64, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(0)
    make = lambda length: torch.randn(batch, length, heads * head_dim, generator=generator).to(dtype)  # noqa: E731
    return make(lq), make(lk), make(lk)


def test_choices_resolve_as_the_table_says(comfy_host, caplog):
    from velox.host.attention_select import resolve_attention

    assert resolve_attention("auto", lowp=False) is None
    assert resolve_attention("auto", lowp=True) == "8bit"
    assert resolve_attention("8bit-accurate", lowp=False) == "8bit-accurate"
    with caplog.at_level(logging.WARNING):
        assert resolve_attention("fa3", lowp=False) is None  # no fa3-fwd wheel, no Hopper here
    assert "fa3" in caplog.text and "ComfyUI's attention" in caplog.text
    with pytest.raises(ValueError, match="attention 'flash9' is not one of auto, sdpa"):
        resolve_attention("flash9", lowp=False)


@pytest.mark.parametrize("choice, tolerance", [("8bit", 5e-2), ("8bit-accurate", 2e-2)])
def test_8bit_override_matches_core_sdpa_on_token_first_and_head_first_layouts(comfy_host, choice, tolerance):
    from comfy.ldm.modules.attention import attention_pytorch

    from velox.host.attention_select import OVERRIDES

    q, k, v = qkv()
    want = attention_pytorch(q, k, v, 2)
    got = OVERRIDES[choice](attention_pytorch, q, k, v, 2)
    assert got.shape == want.shape == (1, 40, 128) and got.dtype == q.dtype
    assert relative_l2(got, want) < tolerance

    heads_first = [t.view(1, -1, 2, 64).transpose(1, 2) for t in (q, k, v)]
    got = OVERRIDES[choice](attention_pytorch, *heads_first, 2, skip_reshape=True, skip_output_reshape=True)
    assert got.shape == (1, 2, 40, 64)
    assert relative_l2(got.transpose(1, 2).reshape(1, 40, 128), want) < tolerance


def test_masked_calls_and_other_head_widths_go_to_core_unchanged(comfy_host):
    from velox.host.attention_select import OVERRIDES

    calls = []

    def core(*args, **kwargs):
        calls.append(kwargs)
        return "core"

    q, k, v = qkv()
    assert OVERRIDES["8bit"](core, q, k, v, 2, mask=torch.zeros(40, 52)) == "core"
    q, k, v = qkv(head_dim=32)
    assert OVERRIDES["8bit"](core, q, k, v, 2) == "core"
    assert len(calls) == 2


def test_wan_model_routes_every_attention_call_through_the_installed_override(comfy_host):
    """A tiny core WanModel behind a patcher: the choice reaches its attention via transformer_options."""
    import comfy.ldm.wan.model as wan
    import comfy.ops
    import comfy.sd

    from velox.host import attention_select

    net = wan.WanModel(model_type="t2v", in_dim=16, dim=128, ffn_dim=256, out_dim=16, num_heads=1, num_layers=2,
                       operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(1)
    state = {key: torch.randn(value.shape, generator=generator) * 0.05 for key, value in net.state_dict().items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(state)
    calls = []
    attention_select.OVERRIDES["spy"] = lambda func, *args, **kwargs: calls.append(args[0].shape) or func(*args, **kwargs)
    try:
        attention_select.apply_attention_choice(patcher, "sdpa")
        assert patcher.model_options["transformer_options"]["optimized_attention_override"] is \
            attention_select.OVERRIDES["sdpa"]
        patcher.model_options["transformer_options"]["optimized_attention_override"] = attention_select.OVERRIDES["spy"]
        x = torch.randn(1, 16, 1, 4, 4)
        context = torch.randn(1, 8, 4096)
        options = {"transformer_options": patcher.model_options["transformer_options"]}
        patcher.model.diffusion_model(x, torch.tensor([500.0]), context, **options)
    finally:
        del attention_select.OVERRIDES["spy"]
    assert len(calls) == 4  # self- and cross-attention of each of the two blocks


def test_videocrafter_unet_attention_modules_take_the_choice(comfy_host):
    """Velox's own UNet3D calls its attention without transformer_options: the choice is bound into
    its attention modules, and a head width the 8-bit kernel lacks falls back to core exactly."""
    from types import SimpleNamespace

    from velox.host import attention_select
    from velox.host.videocrafter_model import VideoCrafterUNet
    from velox.models.unet3d_attention import CrossAttention
    from velox.tiny.videocrafter import TINY_UNETS

    unet = VideoCrafterUNet(TINY_UNETS["vc2"]).eval()
    for parameter in unet.parameters():
        torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(parameter.numel()))
    inputs = (torch.randn(1, 4, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32))
    with torch.no_grad():
        before = unet(*inputs)
    patcher = SimpleNamespace(model=unet, model_options={})
    attention_select.apply_attention_choice(patcher, "8bit")
    routed = [m.attention for m in unet.modules() if isinstance(m, CrossAttention)]
    chosen = attention_select.OVERRIDES["8bit"]  # partial(_run_heads_first, kernel): binding flattens it
    assert routed and all(fn.func is chosen.func and fn.args[:-1] == chosen.args for fn in routed)
    with torch.no_grad():
        assert torch.equal(unet(*inputs), before)  # tiny heads (width < 64): core's attention, unchanged


@pytest.mark.parametrize("installed", ["fa3_fwd_interface", "flash_attn_interface"])
def test_fa3_is_found_under_both_module_names(comfy_host, monkeypatch, installed):
    """PyPI's fa3-fwd wheel ships ``fa3_fwd_interface``; a source build of FA3 ``flash_attn_interface``."""
    import importlib.util
    import types

    from velox.host import attention_select

    calls = []
    module = types.SimpleNamespace(flash_attn_func=lambda q, k, v: calls.append(q.shape) or q)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == installed else real_find_spec(name, *a))
    monkeypatch.setattr(attention_select.importlib, "import_module", lambda name: module if name == installed else None)
    monkeypatch.setattr(attention_select.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention_select.torch.cuda, "get_device_capability", lambda: (9, 0))
    assert attention_select.fa3_available() is None
    q = torch.zeros(1, 2, 5, 64)
    assert attention_select.fa3_attention(q, q, q).shape == q.shape
    assert calls == [(1, 5, 2, 64)]  # FA3 takes (B, L, H, D)

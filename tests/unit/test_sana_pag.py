"""Linear-attention PAG on ComfyUI's engine vs the official rule computed by hand (fp32, tiny Sana).

Reference: three direct forwards of the same transformer (uncond, cond, and cond with block i's
linear attention swapped for ``proj(V)`` by replacing that module's forward), combined as
``v = uncond + cfg (cond - uncond) + pag (cond - perturbed)``; one Euler step to sigma 0 returns
``x - sigma v``.
"""

from __future__ import annotations

import pytest
import torch

from velox.tiny.sana import TINY_SANA_CONFIGS, tiny_sana_state_dict

CONFIG = TINY_SANA_CONFIGS["sana_1600m_style"]  # 3 blocks
SIGMA, CFG, PAG, TOKENS = 0.8, 4.5, 2.0, 10
PARITY_RTOL = 1e-5  # relative L2, fp32


@pytest.fixture(scope="module")
def model(comfy_host):
    from velox.host.sana_model import build_sana_model

    return build_sana_model(tiny_sana_state_dict(CONFIG, seed=6), dtype=torch.float32)


def inputs():
    g = torch.Generator().manual_seed(9)
    positive = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    negative = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    mask = torch.ones(1, TOKENS, dtype=torch.long)
    mask[:, 6:] = 0
    noise = torch.randn(1, 32, 6, 5, generator=g)
    return positive, negative, mask, noise


def comfy_one_step(model, cfg: float) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers

    from velox.host.sana_model import SANA_SCALE_FACTOR

    positive, negative, mask, noise = inputs()
    samples = comfy.sample.sample_custom(
        model, noise, cfg, comfy.samplers.sampler_object("euler"), torch.tensor([SIGMA, 0.0]),
        [[positive, {"attention_mask": mask}]], [[negative, {"attention_mask": mask}]], torch.zeros_like(noise),
        disable_pbar=True, seed=0)
    return samples * SANA_SCALE_FACTOR


def reference_denoised(model, layer: int, cfg: float, pag: float) -> torch.Tensor:
    positive, negative, mask, noise = inputs()
    transformer = model.model.diffusion_model
    x, t = SIGMA * noise, torch.tensor([SIGMA * 1000.0])
    attn = transformer.blocks[layer].attn

    def identity_attention(tokens, replace=None, extra_options=None):
        _, _, v = attn.qkv(tokens).chunk(3, dim=-1)
        return attn.proj(v)

    with torch.no_grad():
        uncond = transformer(x, t, negative, mask)
        cond = transformer(x, t, positive, mask)
        attn.forward = identity_attention
        try:
            perturbed = transformer(x, t, positive, mask)
        finally:
            del attn.forward
    velocity = uncond + cfg * (cond - uncond) + pag * (cond - perturbed)
    return x - SIGMA * velocity


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layer", [0, 2])
def test_pag_with_cfg_matches_the_official_rule_computed_by_hand(model, layer):
    from velox.host.sana_pag import with_sana_pag

    ours = comfy_one_step(with_sana_pag(model, PAG, layer), CFG)
    expected = reference_denoised(model, layer, CFG, PAG)
    error = relative_l2(ours, expected)
    print(f"PAG layer {layer}: relative L2 {error:.2e}")
    assert error <= PARITY_RTOL
    assert relative_l2(expected, reference_denoised(model, layer, CFG, 0.0)) > 1e-3, "PAG must change the result"


def test_pag_scale_zero_is_plain_cfg(model):
    from velox.host.sana_pag import with_sana_pag

    ours = comfy_one_step(with_sana_pag(model, 0.0, 1), CFG)
    assert relative_l2(ours, reference_denoised(model, 1, CFG, 0.0)) <= PARITY_RTOL


def test_pag_layer_defaults_to_the_official_block_for_the_size(comfy_host):
    from velox.host.sana_pag import AUTO_LAYER, pag_layer

    assert pag_layer(20, AUTO_LAYER) == 8  # Sana 1.6B
    assert pag_layer(28, AUTO_LAYER) == 14  # Sana 0.6B
    assert pag_layer(3, AUTO_LAYER) == 1  # no official value: the middle block
    assert pag_layer(20, 5) == 5
    with pytest.raises(ValueError, match=r"VeloxSanaPAG: layer 20 .*0\.\.19"):
        pag_layer(20, 20)

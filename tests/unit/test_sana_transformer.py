"""Velox's Sana transformer against diffusers' SanaTransformer2DModel, loaded from every layout.

Tiny configs of the real architecture (0.6B- and 1.6B-style, Sana-1.5 q/k norm, 2K/4K sincos PE,
Sprint guidance), fp32 on the CPU, one text mask with padding in one batch element.
"""

from __future__ import annotations

import math

import pytest
import torch

from velox.loaders.sana_detect import load_sana_checkpoint, sniff_sana
from velox.loaders.sana_keys import official_to_diffusers
from velox.models.sana import (
    LINEAR_ATTENTION_EPS,
    SANA_PRESETS,
    SanaTransformer,
    relu_linear_attention,
    sincos_pos_embed_2d,
)
from velox.tiny import sana as tiny

diffusers = pytest.importorskip("diffusers")
from diffusers import SanaTransformer2DModel  # noqa: E402

PARITY_RTOL = 1e-5  # relative L2, fp32
LAYOUTS = ("official_pth", "official_safetensors", "diffusers_file", "diffusers_legacy_file",
           "diffusers_folder", "diffusers_sharded_folder", "comfyui_file", "hf_cache")
# A diffusers single file carries no trace of the PE (diffusers never saves the buffer); there the
# preset the user picks supplies it, as the loader node's override does.
NEEDS_PRESET_HINT = {("sana_2k_pe", "diffusers_file"), ("sana_2k_pe", "diffusers_legacy_file"),
                     ("sana_4k_pe", "diffusers_file"), ("sana_4k_pe", "diffusers_legacy_file")}
SPRINT_GUIDANCE = torch.tensor([4.5, 3.0])
TIMESTEPS = torch.tensor([412.75, 873.5])  # sigma * 1000, deliberately fractional


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def make_inputs(config, height: int = 6, width: int = 10, tokens: int = 7, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, height, width, generator=generator)
    context = torch.randn(2, tokens, config.caption_channels, generator=generator)
    mask = torch.ones(2, tokens)
    mask[1, 4:] = 0  # the second prompt is shorter: three padded tokens
    return x, context, mask


def run_ours(model: SanaTransformer, config, x, context, mask, timesteps=TIMESTEPS) -> torch.Tensor:
    guidance = SPRINT_GUIDANCE if config.guidance_embeds else None
    with torch.no_grad():
        return model(x, timesteps, context, context_mask=mask, guidance=guidance)


def run_diffusers(model, config, x, context, mask) -> torch.Tensor:
    """diffusers takes Sprint's timestep in [0, 1] and guidance pre-scaled by the pipeline."""
    timesteps = TIMESTEPS / config.timestep_norm_scale
    extra = {"guidance": SPRINT_GUIDANCE * config.guidance_embeds_scale} if config.guidance_embeds else {}
    with torch.no_grad():
        return model(x, context, timesteps, encoder_attention_mask=mask, **extra).sample


def diffusers_model(config) -> SanaTransformer2DModel:
    """diffusers' model built from the config.json our writer produces for ``config``."""
    kwargs = {k: v for k, v in tiny.diffusers_transformer_config(config).items() if not k.startswith("_")}
    return SanaTransformer2DModel(**kwargs).eval()


def canonical(weights) -> dict[str, torch.Tensor]:
    return sniff_sana(weights)[1]


def build_ours(config, state_dict) -> SanaTransformer:
    model = SanaTransformer.from_config(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def references():
    """Per tiny variant: its official weights, inputs and diffusers' output for them."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            config = tiny.TINY_SANA_CONFIGS[variant]
            weights = tiny.tiny_sana_state_dict(config, seed=11)
            reference = diffusers_model(config)
            reference.load_state_dict(official_to_diffusers(weights), strict=True)
            inputs = make_inputs(config)
            cache[variant] = (config, weights, inputs, run_diffusers(reference, config, *inputs))
        return cache[variant]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", sorted(tiny.TINY_SANA_CONFIGS))
def test_loaded_from_each_layout_matches_diffusers_with_text_mask(references, tmp_path, variant, layout):
    config, weights, inputs, want = references(variant)
    path = tiny.write_all_layouts(tmp_path, config, weights)[layout]
    hint = config if (variant, layout) in NEEDS_PRESET_HINT else None
    detected, state_dict = load_sana_checkpoint(path, config=hint)
    assert detected.model_kwargs() == config.model_kwargs()
    got = run_ours(build_ours(detected, state_dict), detected, *inputs)
    assert got.shape == want.shape == inputs[0].shape
    assert relative_l2(got, want) <= PARITY_RTOL


def test_pe_variant_matches_diffusers_at_its_trained_size(references):
    """At H = W = sample_size diffusers uses its stored buffer, elsewhere it recomputes: both agree."""
    config, weights, _, _ = references("sana_2k_pe")
    inputs = make_inputs(config, height=config.sample_size, width=config.sample_size)
    reference = diffusers_model(config)
    reference.load_state_dict(official_to_diffusers(weights), strict=True)
    ours = build_ours(config, canonical(weights))
    want = run_diffusers(reference, config, *inputs)
    assert relative_l2(run_ours(ours, config, *inputs), want) <= PARITY_RTOL


def test_official_to_diffusers_table_equals_diffusers_own_converter(references):
    from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers

    _, weights, _, _ = references("sana_600m_style")
    theirs = convert_sana_transformer_to_diffusers(dict(weights))
    ours = official_to_diffusers(weights)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fractional_timesteps_are_not_truncated(references):
    config, weights, (x, context, mask), _ = references("sana_600m_style")
    model = build_ours(config, canonical(weights))
    whole = run_ours(model, config, x, context, mask, timesteps=torch.tensor([500.0, 500.0]))
    fraction = run_ours(model, config, x, context, mask, timesteps=torch.tensor([500.4, 500.4]))
    assert relative_l2(fraction, whole) > 1e-6


def test_padded_text_tokens_do_not_change_the_output(references):
    config, weights, (x, context, mask), _ = references("sana15_qk_norm")
    model = build_ours(config, canonical(weights))
    altered = context.clone()
    altered[1, 4:] = 100.0 * torch.randn_like(altered[1, 4:])
    original = run_ours(model, config, x, context, mask)
    assert relative_l2(run_ours(model, config, x, altered, mask), original) < 1e-7


def test_bool_and_float_text_masks_agree(references):
    config, weights, (x, context, mask), _ = references("sana_600m_style")
    model = build_ours(config, canonical(weights))
    as_float = run_ours(model, config, x, context, mask)
    assert torch.equal(run_ours(model, config, x, context, mask.bool()), as_float)


def test_sprint_guidance_defaults_to_4_5_and_changes_the_output(references):
    config, weights, (x, context, mask), _ = references("sprint")
    model = build_ours(config, canonical(weights))
    with torch.no_grad():
        default = model(x, TIMESTEPS, context, context_mask=mask)
        explicit = model(x, TIMESTEPS, context, context_mask=mask, guidance=4.5)
        other = model(x, TIMESTEPS, context, context_mask=mask, guidance=torch.tensor([2.0, 2.0]))
    assert torch.equal(default, explicit)
    assert relative_l2(other, default) > 1e-4


def test_linear_attention_equals_padded_ones_formulation_to_fp32_precision():
    """The official/diffusers form: pad V with a row of ones, (V K^T) Q, divide by the last row
    (reference in float64; ours accumulates in fp32 whatever the input dtype)."""
    generator = torch.Generator().manual_seed(0)
    B, N, heads, d = 2, 12, 3, 32
    q, k, v = (torch.randn(B, N, heads * d, generator=generator, dtype=torch.float64) for _ in range(3))
    got = relu_linear_attention(q, k, v, heads)
    qh, kh, vh = (t.view(B, N, heads, d).permute(0, 2, 3, 1) for t in (q.relu(), k.relu(), v))  # (B, h, d, N)
    padded = torch.nn.functional.pad(vh, (0, 0, 0, 1), value=1.0)  # (B, h, d + 1, N)
    out = (padded @ kh.transpose(2, 3)) @ qh  # (B, h, d + 1, N)
    want = (out[:, :, :-1] / (out[:, :, -1:] + LINEAR_ATTENTION_EPS)).permute(0, 3, 1, 2).reshape(B, N, -1)
    assert got.dtype == torch.float64
    assert relative_l2(got, want) < 1e-6


def test_linear_attention_in_bfloat16_accumulates_in_float32():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4096, 64, generator=generator) for _ in range(3))
    exact = relu_linear_attention(q, k, v, heads=2)
    half = relu_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2)
    assert half.dtype == torch.bfloat16
    assert relative_l2(half.float(), exact) < 1e-2  # bf16 inputs and output, fp32 sums over 4096 tokens


def test_sincos_pe_matches_diffusers_for_non_square_grids():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for (height, width), base, interpolation in (((6, 10), 8, 1.0), ((16, 12), 8, 2.0)):
        want = get_2d_sincos_pos_embed(64, (height, width), base_size=base, interpolation_scale=interpolation,
                                       output_type="pt").float()
        got = sincos_pos_embed_2d(64, height, width, base, interpolation, torch.device("cpu"))[0]
        assert torch.allclose(got, want, atol=1e-6)


def test_block_and_attention_hooks_from_transformer_options_are_called(references):
    config, weights, (x, context, mask), _ = references("sana_600m_style")
    model = build_ours(config, canonical(weights))
    calls = []

    def whole_block(args, extra):
        calls.append("block")
        return extra["original_block"](args)

    def linear_attention(q, k, v, options):
        calls.append(("attn", options["block_index"], options["heads"]))
        return relu_linear_attention(q, k, v, options["heads"])

    options = {"patches_replace": {"dit": {("double_block", 0): whole_block},
                                   "attn1": {("sana_block", 1): linear_attention}}}
    plain = run_ours(model, config, x, context, mask)
    with torch.no_grad():
        hooked = model(x, TIMESTEPS, context, context_mask=mask, transformer_options=options)
    assert calls == ["block", ("attn", 1, 2)]
    assert torch.equal(hooked, plain)


def test_forward_traces_as_one_graph_without_breaks(references):
    """torch.compile friendliness: dynamo captures the whole forward (eager backend: no codegen)."""
    import torch._dynamo

    config, weights, (x, context, mask), _ = references("sana_2k_pe")
    model = build_ours(config, canonical(weights))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(x, TIMESTEPS, context, context_mask=mask)
    assert relative_l2(got, run_ours(model, config, x, context, mask)) < 1e-6
    torch._dynamo.reset()


PUBLISHED_SIZES = [("sana_600m", 0.55e9, 0.65e9), ("sana_1600m", 1.55e9, 1.7e9),
                   ("sana15_4800m", 4.5e9, 4.9e9), ("sprint_1600m", 1.55e9, 1.7e9)]


@pytest.mark.parametrize("name, low, high", PUBLISHED_SIZES)
def test_presets_have_the_published_parameter_counts(name, low, high):
    with torch.device("meta"):
        model = SanaTransformer.from_config(SANA_PRESETS[name])
    count = sum(p.numel() for p in model.parameters())
    assert low <= count <= high, f"{name}: {count / 1e9:.3f}B"


def test_presets_build_the_same_modules_as_diffusers_real_configs():
    """Shapes only (meta tensors): every preset's official names map onto diffusers' model 1:1."""
    for name, config in SANA_PRESETS.items():
        with torch.device("meta"):
            ours = SanaTransformer.from_config(config).state_dict()
            theirs = diffusers_model(config).state_dict()
        mapped = official_to_diffusers(ours)
        assert sorted(mapped) == sorted(theirs), name
        for key, tensor in mapped.items():
            assert math.prod(tensor.shape) == math.prod(theirs[key].shape), (name, key)

"""Wan loading onto ComfyUI core's WanModel / VaceWanModel / WanVAE, against diffusers, from every layout.

Tiny configs of the real architecture (T2V, Wan 2.1 I2V with its CLIP image embedding, a Wan 2.2
A14B I2V expert, VACE), fp32 on the CPU. The diffusers reference gets its weights from diffusers'
own ``convert_wan_transformer_to_diffusers`` / ``convert_wan_vae_to_diffusers``, so our key tables
are checked against an independent converter. I2V gets 512 text tokens (diffusers splits the joint
context at -512 to find the image tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from velox.errors import VeloxLoadError
from velox.loaders.wan_detect import detect_wan_variant, sniff_wan
from velox.loaders.wan_keys import official_to_diffusers
from velox.tiny import wan as tiny

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, WanTransformer3DModel, WanVACETransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

PARITY_RTOL = 1e-5  # relative L2, fp32
TEXT_TOKENS = 512
TIMESTEPS = torch.tensor([412.75, 873.5])  # sigma * 1000, deliberately fractional
LAYOUTS = ("official_file", "comfyui_file", "official_sharded_folder", "diffusers_file", "diffusers_folder",
           "diffusers_sharded_folder", "hf_cache")


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def make_inputs(config: tiny.TinyWanConfig, seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(2, config.in_dim, 2, 4, 6, generator=generator),
              "context": torch.randn(2, TEXT_TOKENS, config.text_dim, generator=generator)}
    if config.image_embedding:
        inputs["clip_fea"] = torch.randn(2, 257, tiny.CLIP_IMAGE_DIM, generator=generator)
    if config.vace_layers:
        inputs["control"] = torch.randn(2, config.vace_in_dim, 2, 4, 6, generator=generator)
    return inputs


def run_diffusers(config: tiny.TinyWanConfig, weights, inputs) -> torch.Tensor:
    kwargs = {k: v for k, v in config.diffusers_config().items() if not k.startswith("_")}
    model_class = WanVACETransformer3DModel if config.vace_layers else WanTransformer3DModel
    model = model_class(**kwargs).eval()
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(weights)), strict=True)
    extra = {"control_hidden_states": inputs["control"]} if config.vace_layers else {}
    with torch.no_grad():
        return model(hidden_states=inputs["x"], timestep=TIMESTEPS, encoder_hidden_states=inputs["context"],
                     encoder_hidden_states_image=inputs.get("clip_fea"), return_dict=False, **extra)[0]


def run_core(patcher, inputs) -> torch.Tensor:
    extra = {}
    if "control" in inputs:
        extra = {"vace_context": inputs["control"][:, None], "vace_strength": [1.0]}
    with torch.no_grad():
        return patcher.model.diffusion_model(inputs["x"], TIMESTEPS, inputs["context"],
                                             clip_fea=inputs.get("clip_fea"), **extra)


def write_layout(tmp_path, layout: str, config: tiny.TinyWanConfig, weights):
    if layout == "official_file":
        return tiny.write_official_file(weights, tmp_path / "wan_official.safetensors")
    if layout == "comfyui_file":
        return tiny.write_comfyui_file(weights, tmp_path / "wan_comfyui.safetensors")
    if layout == "official_sharded_folder":
        return tiny.write_official_folder(weights, tmp_path / "wan_official", config, shards=3)
    if layout == "diffusers_file":
        return tiny.write_diffusers_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    if layout == "diffusers_folder":
        return tiny.write_diffusers_folder(weights, tmp_path / "wan_diffusers", config)
    sharded = tiny.write_diffusers_folder(weights, tmp_path / "wan_sharded", config, shards=3)
    if layout == "diffusers_sharded_folder":
        return sharded
    snapshot = tiny.write_hf_cache_repo(sharded, tmp_path / "hub", "Wan-AI/Tiny-Wan-Diffusers")
    assert snapshot.is_dir()
    return "hf-cache: Wan-AI/Tiny-Wan-Diffusers"


@pytest.fixture(scope="module")
def references():
    """Per tiny variant: its official weights, inputs and diffusers' output for them."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            config = tiny.TINY_WAN_CONFIGS[variant]
            weights = tiny.tiny_wan_state_dict(config, seed=11)
            inputs = make_inputs(config)
            cache[variant] = (config, weights, inputs, run_diffusers(config, weights, inputs))
        return cache[variant]

    return get


# ----------------------------------------------------------------------------------------------
# transformer parity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", sorted(tiny.TINY_WAN_CONFIGS))
def test_core_wan_loaded_from_each_layout_matches_diffusers(comfy_host, monkeypatch, references, tmp_path,
                                                            variant, layout):
    from velox.host.wan_loading import load_wan_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    config, weights, inputs, want = references(variant)
    patcher = load_wan_model(write_layout(tmp_path, layout, config, weights), dtype=torch.float32)
    expected_class = "VaceWanModel" if config.vace_layers else "WanModel"
    assert type(patcher.model.diffusion_model).__name__ == expected_class
    got = run_core(patcher, inputs)
    assert got.shape == want.shape == (2, config.out_dim, 2, 4, 6)
    assert relative_l2(got, want) <= PARITY_RTOL


def test_wan22_folder_loads_both_experts_each_matching_diffusers(comfy_host, references, tmp_path):
    from velox.host.wan_loading import load_wan_experts, load_wan_model

    config, high_weights, inputs, want_high = references("wan22_i2v_expert")
    low_weights = tiny.tiny_wan_state_dict(config, seed=12)
    folder = tiny.write_wan22_folder(high_weights, low_weights, tmp_path / "wan22", config, shards=2)
    high, low = load_wan_experts(folder, dtype=torch.float32)
    want_low = run_diffusers(config, low_weights, inputs)
    assert relative_l2(run_core(high, inputs), want_high) <= PARITY_RTOL
    assert relative_l2(run_core(low, inputs), want_low) <= PARITY_RTOL
    assert relative_l2(want_low, want_high) > 0.1  # the two experts really are different weights
    single = load_wan_model(folder, dtype=torch.float32, expert="low_noise")
    assert relative_l2(run_core(single, inputs), want_low) <= PARITY_RTOL


def test_official_wan22_folder_loads_high_and_low_noise_experts(comfy_host, references, tmp_path):
    from velox.host.wan_loading import load_wan_experts

    config, high_weights, inputs, want_high = references("wan22_i2v_expert")
    low_weights = tiny.tiny_wan_state_dict(config, seed=12)
    folder = tiny.write_official_wan22_folder(high_weights, low_weights, tmp_path / "Wan2.2-I2V-A14B", config)
    high, low = load_wan_experts(folder, dtype=torch.float32)
    assert relative_l2(run_core(high, inputs), want_high) <= PARITY_RTOL
    assert relative_l2(run_core(low, inputs), run_diffusers(config, low_weights, inputs)) <= PARITY_RTOL


def test_official_to_diffusers_table_equals_diffusers_own_converter(references):
    for variant in ("i2v", "vace"):
        _, weights, _, _ = references(variant)
        theirs = convert_wan_transformer_to_diffusers(dict(weights))
        ours = official_to_diffusers(weights)
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("variant", ["t2v", "wan22_i2v_expert", "vace"])
def test_wan_made_for_a_narrower_umt5_builds_on_core_with_its_text_dim(comfy_host, tmp_path, variant):
    """Core's detection fixes text_dim at 4096; a tiny-umT5 Wan (text_dim 64, as the demos) is built by
    core's supported-model config told the real width, and still equals diffusers."""
    import dataclasses

    from velox.host.wan_loading import load_wan_model

    config = dataclasses.replace(tiny.TINY_WAN_CONFIGS[variant], text_dim=tiny.TINY_UMT5["d_model"])
    weights = tiny.tiny_wan_state_dict(config, seed=5)
    inputs = make_inputs(config)
    patcher = load_wan_model(tiny.write_comfyui_file(weights, tmp_path / "wan.safetensors"), dtype=torch.float32)
    assert patcher.model.diffusion_model.text_embedding[0].in_features == 64
    expected_class = "VaceWanModel" if config.vace_layers else "WanModel"
    assert type(patcher.model.diffusion_model).__name__ == expected_class
    assert relative_l2(run_core(patcher, inputs), run_diffusers(config, weights, inputs)) <= PARITY_RTOL


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


def _meta_weights(**config) -> dict[str, torch.Tensor]:
    shapes = tiny.wan_official_shapes(tiny.TinyWanConfig("release", **config))
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


RELEASES = {  # released shapes (wan.md §5.1), built on the meta device
    "Wan 2.1 T2V 1.3B": dict(dim=1536, ffn_dim=8960, num_layers=30),
    "Wan 2.1 T2V 14B / Wan 2.2 A14B T2V expert": dict(dim=5120, ffn_dim=13824, num_layers=40),
    "Wan 2.1 I2V 14B (CLIP image embedding)": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36,
                                                   image_embedding=True),
    "Wan 2.2 A14B I2V expert": dict(dim=5120, ffn_dim=13824, num_layers=40, in_dim=36),
    "Wan 2.1 VACE 1.3B": dict(dim=1536, ffn_dim=8960, num_layers=30, vace_layers=(0, 2, 4, 6, 8, 10, 12, 14)),
    "Wan 2.1 VACE 14B": dict(dim=5120, ffn_dim=13824, num_layers=40, vace_layers=(0, 5, 10, 15, 20, 25, 30, 35)),
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_detects_each_release_from_shapes_in_every_layout(name):
    weights = _meta_weights(**RELEASES[name])
    for layout in (weights, {"model.diffusion_model." + k: v for k, v in weights.items()},
                   official_to_diffusers(weights)):
        variant, canonical = sniff_wan(layout)
        assert variant.name == name
        assert sorted(canonical) == sorted(weights)
    assert variant.num_layers == RELEASES[name]["num_layers"]
    assert variant.vace_layers == len(RELEASES[name].get("vace_layers", ()))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_corrupt_shard_index_is_a_clear_error(comfy_host, references, tmp_path):
    from velox.host.wan_loading import load_wan_model

    config, weights, _, _ = references("t2v")
    folder = tiny.write_diffusers_folder(weights, tmp_path / "wan", config, shards=2)
    (folder / "transformer" / (tiny.DIFFUSERS_WEIGHTS + ".index.json")).write_text('{"weight_map": [1, 2')
    with pytest.raises(VeloxLoadError, match=r"index\.json: corrupt shard index"):
        load_wan_model(folder)


def test_missing_shard_is_a_clear_error(comfy_host, references, tmp_path):
    from velox.host.wan_loading import load_wan_model

    config, weights, _, _ = references("t2v")
    folder = tiny.write_diffusers_folder(weights, tmp_path / "wan", config, shards=2)
    index = json.loads((folder / "transformer" / (tiny.DIFFUSERS_WEIGHTS + ".index.json")).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / "transformer" / shard).unlink()
    with pytest.raises(VeloxLoadError, match=f"shard {shard} listed in the index is missing"):
        load_wan_model(folder)


def test_expert_pair_of_different_sizes_is_refused(comfy_host, references, tmp_path):
    from velox.host.wan_loading import load_wan_experts

    config, weights, _, _ = references("t2v")
    deeper = tiny.TinyWanConfig("tiny_wan_t2v_3_blocks", num_layers=3)
    folder = tiny.write_wan22_folder(weights, tiny.tiny_wan_state_dict(deeper), tmp_path / "wan22", config, deeper)
    with pytest.raises(VeloxLoadError, match=r"the two experts differ: transformer/ is .*2 blocks.*"
                                             r"transformer_2/ is .*3 blocks"):
        load_wan_experts(folder)


def test_single_model_folder_is_not_an_expert_pair(comfy_host, references, tmp_path):
    from velox.host.wan_loading import load_wan_experts

    config, weights, _, _ = references("t2v")
    folder = tiny.write_diffusers_folder(weights, tmp_path / "wan", config)
    with pytest.raises(VeloxLoadError, match="holds one model, not a Wan 2.2 expert pair"):
        load_wan_experts(folder)


@pytest.mark.parametrize("layout", ("official", "diffusers"))
def test_vace_module_without_its_base_model_is_refused(comfy_host, references, tmp_path, layout):
    from velox.host.wan_loading import load_wan_model

    _, weights, _, _ = references("vace")
    module = {k: v for k, v in weights.items() if k.startswith("vace_")}
    path = (tiny.write_official_file if layout == "official" else tiny.write_diffusers_file)(
        module, tmp_path / "wan_vace_module.safetensors")
    with pytest.raises(VeloxLoadError, match="wan_vace_module.safetensors: is a VACE module without its base model"):
        load_wan_model(path)


def test_sana_file_in_the_wan_loader_names_what_it_is(comfy_host, tmp_path):
    from velox.host.wan_loading import load_wan_model
    from velox.tiny import sana as tiny_sana

    weights = tiny_sana.tiny_sana_state_dict(tiny_sana.TINY_SANA_CONFIGS["sana_600m_style"])
    path = tiny.write_official_file(weights, tmp_path / "sana.safetensors")
    with pytest.raises(VeloxLoadError, match="sana.safetensors: looks like a Sana transformer, not a Wan transformer"):
        load_wan_model(path)


def test_incomplete_wan_checkpoint_is_refused(references):
    _, weights, _, _ = references("t2v")
    with pytest.raises(VeloxLoadError, match=r"incomplete: no \['head.head.weight'\]"):
        detect_wan_variant({k: v for k, v in weights.items() if not k.startswith("head.head")})


# ----------------------------------------------------------------------------------------------
# VAE and umT5
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_reference(comfy_host):
    weights = tiny.tiny_wan_vae_state_dict(seed=5)
    model = AutoencoderKLWan(base_dim=tiny.TINY_VAE_DIM, z_dim=tiny.VAE_Z_DIM, dim_mult=[1, 2, 4, 4],
                             num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True]).eval()
    model.load_state_dict(convert_wan_vae_to_diffusers(dict(weights)), strict=True)
    latent = torch.randn(1, tiny.VAE_Z_DIM, 2, 3, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model.decode(latent).sample  # clamped to [-1, 1]
    return weights, latent, want


@pytest.mark.parametrize("layout", ("official_file", "comfyui_file", "diffusers_file", "diffusers_folder"))
def test_native_wan_vae_decode_matches_diffusers(comfy_host, vae_reference, tmp_path, layout):
    from velox.host.wan_loading import load_wan_vae

    weights, latent, want = vae_reference
    if layout == "official_file":
        path = tiny.write_official_file(weights, tmp_path / "wan_2.1_vae.safetensors")
    elif layout == "comfyui_file":
        path = tiny.write_official_file({"vae." + k: v for k, v in weights.items()}, tmp_path / "vae.safetensors")
    elif layout == "diffusers_file":
        path = tiny.write_official_file(convert_wan_vae_to_diffusers(dict(weights)), tmp_path / "vae_d.safetensors")
    else:
        path = tmp_path / "wan_diffusers"
        tiny.write_official_file(convert_wan_vae_to_diffusers(dict(weights)),
                                 path / "vae" / tiny.DIFFUSERS_WEIGHTS)
    vae = load_wan_vae(path)
    assert (vae.latent_channels, vae.latent_dim) == (16, 3)
    with torch.no_grad():
        raw = vae.first_stage_model.decode(latent).clamp(-1, 1)
    assert raw.shape == want.shape == (1, 3, 5, 24, 32)
    assert relative_l2(raw, want) <= PARITY_RTOL
    assert (want.abs() < 0.99).float().mean() > 0.5  # the comparison is not between saturated images
    images = vae.decode(latent)  # core's path: frames as [B, T, H, W, C] in [0, 1]
    frames = ((want + 1) / 2).permute(0, 2, 3, 4, 1)
    assert relative_l2(images.reshape(frames.shape).float(), frames) <= PARITY_RTOL


def test_vae_loader_refuses_a_transformer(comfy_host, references, tmp_path):
    from velox.host.wan_loading import load_wan_vae

    _, weights, _, _ = references("t2v")
    path = tiny.write_official_file(weights, tmp_path / "not_a_vae.safetensors")
    with pytest.raises(VeloxLoadError, match="not_a_vae.safetensors: does not look like a Wan VAE"):
        load_wan_vae(path)


def test_umt5_from_a_diffusers_folder_matches_transformers_on_core_t5(comfy_host, tmp_path):
    """A diffusers text_encoder/ (transformers UMT5EncoderModel) keeps its names on core's T5; core's
    umT5 class at a tiny size, loaded with what our loader reads, equals transformers."""
    import comfy.ops
    from comfy.text_encoders.t5 import T5
    from transformers import UMT5Config, UMT5EncoderModel

    from velox.host.wan_loading import umt5_state_dict

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    reference = UMT5EncoderModel(config).eval()
    reference.save_pretrained(tmp_path / "wan" / "text_encoder")
    (tmp_path / "wan" / "tokenizer").mkdir()
    (tmp_path / "wan" / "tokenizer" / "spiece.model").write_bytes(b"sentencepiece model bytes")
    state_dict = umt5_state_dict(tmp_path / "wan")
    assert bytes(state_dict.pop("spiece_model").numpy()) == b"sentencepiece model bytes"
    core = T5({"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 48, "num_layers": 3, "vocab_size": 96,
               "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "umt5"},
              torch.float32, "cpu", comfy.ops.disable_weight_init)
    missing, unexpected = core.load_state_dict(state_dict, strict=False)
    assert not missing and not unexpected
    tokens = torch.randint(2, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = reference(input_ids=tokens, attention_mask=mask).last_hidden_state
        got = core(tokens, attention_mask=mask)[0]
    valid = mask.bool()
    assert relative_l2(got[valid], want[valid]) <= PARITY_RTOL


def test_umt5_xxl_shapes_give_cores_own_xxl_config_and_go_through_core_load_clip(comfy_host, monkeypatch, tmp_path):
    """The released umT5-XXL (meta shapes) derives exactly core's umt5_config_xxl.json, so it keeps loading
    through core's load_clip as before (scaled fp8 / quantization metadata included)."""
    import comfy.sd
    import comfy.text_encoders.wan

    from velox.host import wan_loading

    shapes = tiny.umt5_shapes(256384, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64)
    config = wan_loading.umt5_config(shapes)
    assert config == wan_loading.UMT5_XXL
    core_json = json.loads((Path(comfy.text_encoders.wan.__file__).parent / "umt5_config_xxl.json").read_text())
    assert config == {key: core_json[key] for key in config}
    calls = []
    monkeypatch.setattr(wan_loading, "_umt5_shapes", lambda path: shapes)
    monkeypatch.setattr(comfy.sd, "load_clip", lambda paths, **kwargs: calls.append((paths, kwargs)) or "core clip")
    file = tmp_path / "umt5_xxl_fp16.safetensors"
    file.write_bytes(b"")
    assert wan_loading.load_umt5(file) == "core clip"
    assert calls == [([str(file)], {"clip_type": comfy.sd.CLIPType.WAN, "model_options": {}})]


def test_tiny_umt5_file_loads_with_the_config_of_its_shapes_and_encodes(comfy_host, tmp_path):
    """A umT5 that is not XXL (d_model 64, 2 layers, a tiny SentencePiece vocabulary in spiece_model) is
    built by core's Wan text encoder with the config its weights say, through umt5xxl_model_config."""
    from velox.host.wan_loading import load_umt5, umt5_config

    path = tiny.write_tiny_umt5_file(tmp_path / "umt5_xxl_fp16.safetensors")
    weights = tiny.tiny_umt5_state_dict()
    config = umt5_config({k: tuple(v.shape) for k, v in weights.items()})
    assert config["d_model"] == 64 and config["num_layers"] == 2 and config["vocab_size"] < 600
    clip = load_umt5(path)
    encoder = clip.cond_stage_model.umt5xxl.transformer
    assert encoder.shared.weight.shape == (config["vocab_size"], 64) and len(encoder.encoder.block) == 2
    torch.testing.assert_close(encoder.shared.weight.float(), weights["shared.weight"])
    tokens = clip.tokenize("a red fox in fresh snow")
    ids = [token for token, _ in tokens["umt5xxl"][0]]
    assert max(ids) < config["vocab_size"] and ids[:6] != [2] * 6  # known pieces, not all <unk>
    cond = clip.encode_from_tokens_scheduled(tokens)[0][0]
    assert cond.shape[-1] == 64 and torch.isfinite(cond).all()


def test_a_file_that_is_not_umt5_is_a_clear_error(comfy_host, tmp_path):
    from velox.host.wan_loading import load_umt5

    path = tiny.write_official_file({"shared.weight": torch.zeros(4, 4)}, tmp_path / "half.safetensors")
    with pytest.raises(VeloxLoadError, match="half.safetensors: is not a umT5 encoder"):
        load_umt5(path)


@pytest.mark.parametrize("prompt", ["a red fox running through fresh snow at sunrise", tiny.WAN_NEGATIVE_PROMPT_ZH,
                                    "一只红色的狐狸在雪地里奔跑"], ids=["english", "chinese_negative", "chinese"])
def test_umt5_english_and_chinese_prompts_tokenize_as_sentencepiece_and_encode_as_transformers(
        comfy_host, tmp_path, prompt):
    """Through VeloxUMT5Loader's path: the ids are the file's SentencePiece model's plus </s> (no <unk>:
    Chinese text has pieces or byte fallbacks), and the embedding equals transformers' UMT5EncoderModel
    holding the same weights, on every real token."""
    import sentencepiece as spm
    from transformers import UMT5Config, UMT5EncoderModel

    from velox.host.wan_loading import load_umt5

    path = tiny.write_tiny_umt5_file(tmp_path / "umt5_xxl_fp16.safetensors")
    weights = tiny.tiny_umt5_state_dict()
    processor = spm.SentencePieceProcessor(model_proto=bytes(weights["spiece_model"].numpy()))
    clip = load_umt5(path)
    tokens = clip.tokenize(prompt)
    ids = [int(token) for token, _ in tokens["umt5xxl"][0] if token != 0]
    assert ids == processor.encode(prompt) + [1] and 2 not in ids
    cond = clip.encode_from_tokens_scheduled(tokens)[0][0]

    shape = tiny.TINY_UMT5
    config = UMT5Config(vocab_size=weights["shared.weight"].shape[0], d_model=shape["d_model"], d_kv=shape["d_kv"],
                        num_heads=shape["num_heads"], d_ff=shape["d_ff"], num_layers=shape["num_layers"],
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=tiny.UMT5_BUCKETS)
    reference = UMT5EncoderModel(config).eval()
    reference.load_state_dict({k: v.float() for k, v in weights.items() if k != "spiece_model"}, strict=False)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert relative_l2(cond[0, :len(ids)].float(), want) <= PARITY_RTOL

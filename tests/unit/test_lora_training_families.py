"""LoRA training beyond Wan 2.1 (CPU, tiny models): VideoCrafter / DynamiCrafter's DDPM objective, Sana's
flow matching, Wan 2.2's two experts in one run, QLoRA on FP8 / INT8 / GGUF bases, and bad input."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from velox.tiny import sana as tiny_sana
from velox.tiny import wan as tiny_wan

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

WAN_CONFIG = tiny_wan.TinyWanConfig("tiny_wan_train", dim=128, ffn_dim=256, num_layers=2, text_dim=32)
WAN_LATENT = (16, 1, 4, 4)
VC_LATENT = (4, 16, 8, 8)  # DynamiCrafter's Resampler makes tokens for exactly 16 frames


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def lora_moved(lora, before: dict) -> float:
    """The largest relative change of any pair's up factor."""
    return max((lora.pair(n).up.detach() - before[n]).norm().item() / (before[n].norm().item() + 1e-12)
               for n in lora.names)


# ----------------------------------------------------------------------------------------------
# VideoCrafter / DynamiCrafter: eps and v on the release's schedule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, scale_end, zsnr", [("eps", 0.7, False), ("v", 0.7, True), ("eps", None, False)])
def test_ddpm_targets_invert_to_the_scaled_x0_the_ddim_sampler_divides_out(comfy_host, prediction, scale_end, zsnr):
    """lvdm trains on s_t x0 (``use_scale`` / ``use_dynamic_rescale``); its DDIM reads the x0 of an eps or
    v output (``eps_and_x0``) as that scaled x0. The batch's target must give back exactly s_t x0."""
    from velox.host.lora_training import BatchDrawer, DiffusionObjective, Sample, TrainConfig
    from velox.sampling.videocrafter_ddim import VideoDiffusionSchedule, alphas_cumprod, scale_array

    schedule = VideoDiffusionSchedule(prediction=prediction, zero_terminal_snr=zsnr, scale_end=scale_end)
    generator = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randn(VC_LATENT, generator=generator), torch.randn(77, 8, generator=generator))]
    drawer = BatchDrawer(samples, TrainConfig(batch_size=4, seed=2), DiffusionObjective(schedule), torch.device("cpu"))
    batch = drawer.draw()
    t = batch.t
    alpha = torch.from_numpy(alphas_cumprod(schedule)).float()[t].view(-1, 1, 1, 1, 1)
    scale = (torch.ones(1000) if scale_end is None else torch.from_numpy(scale_array(scale_end)).float())[t]
    want_x0 = scale.view(-1, 1, 1, 1, 1) * batch.latent
    x_t, target = batch.noisy(), batch.target()
    assert torch.allclose(x_t, alpha.sqrt() * want_x0 + (1 - alpha).sqrt() * batch.noise, atol=1e-6)
    if prediction == "v":
        x0 = alpha.sqrt() * x_t - (1 - alpha).sqrt() * target  # eps_and_x0's v branch
    else:
        x0 = (x_t - (1 - alpha).sqrt() * target) / alpha.sqrt()
    keep = alpha.view(-1) > 1e-4  # zero terminal SNR: x0 of an eps output is undefined at t = 999
    assert torch.allclose(x0[keep], want_x0[keep], atol=1e-4)
    assert batch.extra["fps"].tolist() == [16] * 4 and "concat" not in batch.extra


@pytest.fixture(scope="module")
def videocrafter(tmp_path_factory, comfy_host):
    """{kind: (MODEL, CLIP, VAE, CLIP_VISION, variant)} of the tiny VideoCrafter 2 and DynamiCrafter 512."""
    from demo_models_videocrafter import write_release_ckpt

    from velox.host.videocrafter_loading import load_videocrafter_checkpoint

    folder = tmp_path_factory.mktemp("vc")
    return {kind: load_videocrafter_checkpoint(write_release_ckpt(folder / f"{kind}.ckpt", kind, seed),
                                               dtype=torch.float32)
            for kind, seed in (("vc2", 0), ("dc512", 1))}


def repeated_clip(shape, seed: int, context_width: int, tokens=None):
    """A memorisable clip: one random 2x2 patch tiled over every frame and position."""
    from velox.host.lora_training import Sample

    generator = torch.Generator().manual_seed(seed)
    c, t, h, w = shape
    latent = torch.randn(c, 1, 2, 2, generator=generator).repeat(1, t, h // 2, w // 2)
    return Sample(latent.contiguous(), torch.randn(77, context_width, generator=generator), "clip", tokens)


@pytest.mark.parametrize("kind", ["vc2", "dc512"])
def test_videocrafter_loss_falls_on_a_memorisable_clip(videocrafter, kind, one_cpu_thread):
    """VideoCrafter 2 (eps, scale 0.7) and DynamiCrafter 512 (v, zero-SNR, first frame as c_concat and
    CLIP-vision tokens): 60 steps halve the mean loss of the last 10 steps against the first 10."""
    from velox.host.lora_training import TrainConfig, train_lora

    model, _, _, _, variant = videocrafter[kind]
    assert variant.schedule.prediction == ("v" if kind == "dc512" else "eps")
    context_width = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    tokens = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) if variant.is_i2v else None
    clip = repeated_clip(VC_LATENT, 3, context_width, tokens)
    config = TrainConfig(rank=8, alpha=8.0, targets="attention_ffn", learning_rate=3e-3, steps=60, seed=1,
                         weight_decay=0.0, batch_size=2)
    result = train_lora(model, [clip], config, family="videocrafter")
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last <= 0.5 * first, f"{kind}: loss {first:.4f} -> {last:.4f}"
    assert any(".temopral_conv." not in n and "init_attn" in n for n in result.lora.names)  # temporal attention too


def test_dynamicrafter_needs_the_first_frame_tokens_and_says_where_they_come_from(videocrafter):
    from velox.host.lora_training import TrainConfig, train_lora

    model = videocrafter["dc512"][0]
    clip = repeated_clip(VC_LATENT, 3, 64)
    with pytest.raises(ValueError, match="connect the model's CLIP_VISION to the dataset node's clip_vision input"):
        train_lora(model, [clip], TrainConfig(steps=1), family="videocrafter")


def test_videocrafter_lora_loads_through_core_and_changes_the_unet_output(videocrafter, tmp_path, monkeypatch):
    import folder_paths

    import nodes
    from velox.host.lora_training import TrainConfig, save_lora, train_lora, training_metadata
    from velox.loaders.lora_detect import lora_family

    model = videocrafter["vc2"][0]
    config = TrainConfig(rank=4, alpha=4.0, learning_rate=1e-2, steps=3, seed=0)
    result = train_lora(model, [repeated_clip(VC_LATENT, 3, 64)], config, family="videocrafter")
    path = save_lora(tmp_path / "vc.safetensors", result.lora, training_metadata(config, "videocrafter",
                                                                                 result.losses, {}))
    assert lora_family(result.lora.lora_state_dict()) == "videocrafter"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)[0]
    keys = {k for k in patched.patches}
    assert len(keys) == len(result.lora.names)  # every trained pair found its weight in core's key map


# ----------------------------------------------------------------------------------------------
# Sana: flow matching at the model's shift
# ----------------------------------------------------------------------------------------------


def sana_model(tmp_path, kind: str):
    from velox.host.sana_loading import load_sana_model
    from velox.tiny.sana import write_official_pth

    config = tiny_sana.TINY_SANA_CONFIGS[kind]
    path = write_official_pth(tmp_path / f"{kind}.pth", tiny_sana.tiny_sana_state_dict(config, seed=0))
    return load_sana_model(path, dtype=torch.float32), config


def test_sana_trains_with_flow_matching_at_its_own_shift(comfy_host, tmp_path, one_cpu_thread):
    from velox.host.lora_training import Sample, TrainConfig, train_lora, training_objective

    model, config = sana_model(tmp_path, "sana_1600m_style")
    assert training_objective(model, "sana") == float(model.get_model_object("model_sampling").shift)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(config.in_channels, 1, 2, 2, generator=generator).repeat(1, 2, 2, 2)
    clip = Sample(latent, torch.randn(6, config.caption_channels, generator=generator), "frames")
    result = train_lora(model, [clip], TrainConfig(rank=8, alpha=8.0, learning_rate=3e-3, steps=40, seed=0,
                                                   weight_decay=0.0), family="sana")
    assert {n.split(".")[2] for n in result.lora.names} == {"attn", "cross_attn"}
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.8 * first, f"loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_sana_linear_attention_under_autograd_matches_the_fused_inference_path(dtype, tolerance):
    from velox.models.sana import relu_linear_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 64, generator=generator).to(dtype) for _ in range(3))
    with torch.no_grad():
        fused = relu_linear_attention(q, k, v, heads=2)
    q.requires_grad_(True)
    differentiable = relu_linear_attention(q, k, v, heads=2)
    differentiable.float().sum().backward()
    assert differentiable.dtype == fused.dtype and q.grad is not None
    assert relative_l2(differentiable.detach(), fused) <= tolerance


def test_sana_refuses_the_ffn_preset_and_sprint_models(comfy_host, tmp_path):
    from velox.host.lora_training import Sample, TrainConfig, train_lora

    model, config = sana_model(tmp_path, "sana_1600m_style")
    clip = Sample(torch.zeros(config.in_channels, 1, 2, 2), torch.zeros(4, config.caption_channels))
    with pytest.raises(ValueError, match="no LoRA target preset 'attention_ffn' for family 'sana'"):
        train_lora(model, [clip], TrainConfig(targets="attention_ffn", steps=1), family="sana")
    sprint, config = sana_model(tmp_path, "sprint")
    clip = Sample(torch.zeros(config.in_channels, 1, 2, 2), torch.zeros(4, config.caption_channels))
    with pytest.raises(ValueError, match="SANA-Sprint model .* not flow matching"):
        train_lora(sprint, [clip], TrainConfig(steps=1), family="sana")


# ----------------------------------------------------------------------------------------------
# Wan 2.2: both experts in one run, split at the boundary
# ----------------------------------------------------------------------------------------------


def wan_model(seed: int, config=WAN_CONFIG, quantization: str = "none", tmp_path: Path | None = None):
    from velox.host.wan_loading import build_wan_model, load_wan_model
    from velox.loaders.wan_detect import sniff_wan

    weights = tiny_wan.tiny_wan_state_dict(config, seed=seed)
    if quantization == "none":
        variant, canonical = sniff_wan(dict(weights))
        return build_wan_model(canonical, variant, dtype=torch.float32)
    save_file(weights, str(tmp_path / f"wan{seed}.safetensors"))
    return load_wan_model(tmp_path / f"wan{seed}.safetensors", dtype=torch.float32, quantization=quantization)


def wan_samples(count: int, seed: int, text_dim: int = WAN_CONFIG.text_dim):
    from velox.host.lora_training import Sample

    generator = torch.Generator().manual_seed(seed)
    return [Sample(torch.randn(WAN_LATENT, generator=generator), torch.randn(6, text_dim, generator=generator))
            for _ in range(count)]


def test_expert_step_sends_each_sample_to_the_expert_of_its_sigma(comfy_host):
    """Mixed batch: the high-noise prediction sees exactly the samples with sigma >= boundary; the
    summed loss equals the single-model mean over the batch."""
    from velox.host.lora_training import BatchDrawer, TrainConfig, expert_training_step, objective_loss

    config = TrainConfig(batch_size=8, seed=4)
    drawer = BatchDrawer(wan_samples(3, 1), config, 5.0, torch.device("cpu"))
    batch = drawer.draw()
    boundary = 0.875
    assert (batch.sigma >= boundary).any() and (batch.sigma < boundary).any()
    weight = torch.nn.Parameter(torch.ones(()))
    seen = {"high": [], "low": [], "all": []}

    def predictor(side, factor):
        def predict(x, t, context, **_):
            seen[side].extend((t / 1000).tolist())
            return x * weight * factor
        return predict

    optimizer = torch.optim.SGD([weight], lr=0.0)
    loss = expert_training_step(predictor("high", 1.0), predictor("low", 1.0), boundary, optimizer, [batch])
    assert all(s >= boundary for s in seen["high"]) and all(s < boundary for s in seen["low"])
    assert len(seen["high"]) + len(seen["low"]) == 8
    with torch.no_grad():
        assert loss == pytest.approx(objective_loss(predictor("all", 1.0), batch).item(), rel=1e-5)


def test_two_experts_train_in_one_run_and_save_one_lora_each(comfy_host, tmp_path, monkeypatch, one_cpu_thread):
    import folder_paths
    from safetensors import safe_open

    from velox.nodes.lora_training_nodes import VeloxTrainLora

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    high, low = wan_model(1), wan_model(2)
    values = dict(lora_name="pair", rank=4, alpha=4.0, targets="attention", learning_rate=1e-2, steps=6,
                  batch_size=4, grad_accumulation=1, seed=0, lora_dtype="fp32", gradient_checkpointing=False,
                  expert="all", boundary=0.875, resume_from="None")
    output = VeloxTrainLora.execute(high, wan_samples(2, 3), **values, low_noise_model=low)
    model, name, _, low_model = output.args
    assert name == "pair_high_noise.safetensors"
    for side, patched in (("high_noise", model), ("low_noise", low_model)):
        with safe_open(str(tmp_path / f"pair_{side}.safetensors"), "pt") as file:
            metadata = file.metadata()
            up = file.get_tensor("diffusion_model.blocks.0.self_attn.q.lora_up.weight")
        assert metadata["velox.expert"] == side and metadata["velox.steps_done"] == "6"
        assert up.abs().max() > 0  # both experts were trained
        assert any(k.endswith("self_attn.q.weight") for k in patched.patches)
    resumed = VeloxTrainLora.execute(high, wan_samples(2, 3), **{**values, "lora_name": "again", "steps": 1,
                                                                 "resume_from": "pair_high_noise.safetensors"},
                                     low_noise_model=low)
    assert resumed.args[1] == "again_high_noise.safetensors"
    from velox.errors import VeloxLoadError

    with pytest.raises(VeloxLoadError, match="is not a high-noise expert LoRA of a two-expert run"):
        VeloxTrainLora.execute(high, wan_samples(2, 3), **{**values, "resume_from": "pair_low_noise.safetensors"},
                               low_noise_model=low)
    with pytest.raises(ValueError, match="with both experts given, each trains on its own side"):
        VeloxTrainLora.execute(high, wan_samples(2, 3), **{**values, "expert": "high_noise"}, low_noise_model=low)


def test_an_image_to_video_wan_is_refused_by_name(comfy_host):
    from velox.host.lora_training import TrainConfig, train_lora

    config = dataclasses.replace(WAN_CONFIG, in_dim=36)  # Wan 2.2 I2V expert: noise + mask + image latent
    with pytest.raises(ValueError, match="takes 36 input channels for 16 latent channels"):
        train_lora(wan_model(1, config), wan_samples(1, 0), TrainConfig(steps=1))


# ----------------------------------------------------------------------------------------------
# QLoRA: the frozen base stays quantized
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["fp8_e4m3", "int8", "gguf_q8_0"])
def test_qlora_trains_on_a_quantized_frozen_base_on_the_cpu(comfy_host, tmp_path, quantization, one_cpu_thread):
    """The LoRA side product is added to the quantized layer's output, so backward needs only the
    gradient with respect to the layer's input (dequantized weight, as in the forward pass): the packed
    weights never change, the LoRA gets a gradient, and the first loss matches a float model of the
    same dequantized weights."""
    from velox.host.lora_training import TrainConfig, train_lora

    if quantization.startswith("gguf"):
        import demo_models_gguf
        from gguf import GGMLQuantizationType as Q

        from velox.host.wan_loading import load_wan_model

        weights = tiny_wan.tiny_wan_state_dict(WAN_CONFIG, seed=1)
        path = demo_models_gguf.write_gguf_state_dict(tmp_path / "wan-Q8_0.gguf", weights,
                                                      demo_models_gguf.type_for("wan", Q.Q8_0), "wan")
        model = load_wan_model(path, dtype=torch.float32)
        kind = "gguf"
    else:
        model, kind = wan_model(1, quantization=quantization, tmp_path=tmp_path), quantization.split("_")[0]
    layers = {n: m for n, m in model.model.diffusion_model.named_modules() if getattr(m, "weight_kind", "") == kind}
    assert len(layers) == 2 * 10
    packed = {n: m.weight.detach().clone() for n, m in layers.items()}
    config = TrainConfig(rank=4, alpha=4.0, targets="attention_ffn", learning_rate=1e-2, steps=3, seed=0,
                         gradient_checkpointing=True)
    result = train_lora(model, wan_samples(2, 5), config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert max(p.up.abs().max().item() for p in result.lora.pairs.values()) > 0
    for name, module in layers.items():
        assert module.weight.dtype == packed[name].dtype and torch.equal(module.weight, packed[name]), name


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_resuming_a_videocrafter_run_from_a_wan_lora_is_refused_by_name(videocrafter, tmp_path):
    from velox.errors import VeloxLoadError
    from velox.host.lora_training import TrainConfig, train_lora

    wan = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 8),
           "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(VeloxLoadError, match="wan_style.safetensors: is a LoRA of Wan but the model being trained is "
                                             "VideoCrafter / DynamiCrafter"):
        train_lora(videocrafter["vc2"][0], [repeated_clip(VC_LATENT, 3, 64)], TrainConfig(steps=1),
                   family="videocrafter", resume=("wan_style.safetensors", wan))


def test_train_node_refuses_a_model_of_no_trainable_family(comfy_host):
    from velox.errors import VeloxLoadError
    from velox.nodes.lora_training_nodes import _family

    class Stub:
        class model:  # noqa: N801 - the ModelPatcher attribute
            @staticmethod
            def state_dict():
                return {"diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight": torch.zeros(1)}

    with pytest.raises(VeloxLoadError, match="trains Wan, Sana, SANA-Video and VideoCrafter / DynamiCrafter models; this model "
                                             "is of no family Velox knows"):
        _family(Stub())


# ----------------------------------------------------------------------------------------------
# SANA-Video: flow matching at its shift (8), Sana's attention names
# ----------------------------------------------------------------------------------------------


def test_sana_video_trains_with_flow_matching_at_its_own_shift(comfy_host, tmp_path, one_cpu_thread):
    from velox.host.lora_training import Sample, TrainConfig, train_lora, training_objective
    from velox.host.sana_video_model import load_sana_video_model
    from velox.nodes.lora_training_nodes import _family
    from velox.tiny.sana_video import tiny_sana_video_config, tiny_sana_video_state_dict, write_official

    config = tiny_sana_video_config(caption_channels=32)
    path = write_official(tmp_path / "SANA_Video_tiny.pth", tiny_sana_video_state_dict(config))
    model = load_sana_video_model(path, dtype=torch.float32)
    assert _family(model) == "sana_video"
    assert training_objective(model, "sana_video") == 8.0
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 2, 2, 2, generator=generator).repeat(1, 1, 2, 2)
    clip = Sample(latent, torch.randn(6, 32, generator=generator))
    result = train_lora(model, [clip], TrainConfig(rank=8, alpha=8.0, learning_rate=3e-3, steps=40, seed=0,
                                                   weight_decay=0.0), family="sana_video")
    assert {n.split(".")[2] for n in result.lora.names} == {"attn", "cross_attn"}
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.8 * first, f"loss {first:.4f} -> {last:.4f}"


def test_sana_video_captions_are_encoded_as_its_text_node_encodes_prompts(comfy_host, tmp_path):
    """Gemma + a video VAE (SANA-Video): the dataset's caption features equal VeloxSanaVideoTextEncode's
    (video instruction, motion score), padding dropped; with an image VAE they stay Sana's."""
    from velox.host.sana_text_encoder import load_sana_text_encoder
    from velox.host.sana_video_conditioning import encode_sana_video_prompt
    from velox.host.training_data import encode_text
    from velox.tiny.gemma import write_tiny_gemma_single_file

    clip = load_sana_text_encoder(write_tiny_gemma_single_file(tmp_path / "gemma.safetensors"))
    caption = "a red ball rolls across a wooden floor"
    ((cond, extra),) = encode_sana_video_prompt(clip, caption)
    want = cond[0][extra["attention_mask"][0].bool()]
    assert torch.equal(encode_text(clip, caption, video_vae=True), want.float())
    ((image_cond, image_extra),) = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    assert torch.equal(encode_text(clip, caption), image_cond[0][image_extra["attention_mask"][0].bool()].float())

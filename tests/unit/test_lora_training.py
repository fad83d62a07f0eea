"""LoRA training on a tiny Wan (CPU, fp32): one step against diffusers + PEFT, a memorised clip, and the
saved LoRA loading the same through core's LoraLoaderModelOnly and VeloxLoraStack."""

from __future__ import annotations

import pytest
import torch

from velox.loaders.wan_detect import sniff_wan
from velox.loaders.wan_keys import official_to_diffusers_key
from velox.tiny import wan as tiny

STEP_RTOL = 1e-5  # relative L2 of LoRA weights after one step, fp32
TRAIN_CONFIG = tiny.TinyWanConfig("tiny_wan_train", dim=128, ffn_dim=256, num_layers=2, text_dim=32)
LATENT_SHAPE = (16, 1, 4, 4)  # (C, T, H, W): 4 tokens per frame after the 2x2 patch
TEXT_TOKENS = 6


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def weights():
    return tiny.tiny_wan_state_dict(TRAIN_CONFIG, seed=5)


def core_model(weights):
    from velox.host.wan_loading import build_wan_model

    variant, canonical = sniff_wan(dict(weights))
    return build_wan_model(canonical, variant, dtype=torch.float32)


def synthetic_samples(count: int, seed: int):
    from velox.host.lora_training import Sample

    generator = torch.Generator().manual_seed(seed)
    return [Sample(torch.randn(LATENT_SHAPE, generator=generator),
                   torch.randn(TEXT_TOKENS, TRAIN_CONFIG.text_dim, generator=generator), f"clip{i}")
            for i in range(count)]


# ----------------------------------------------------------------------------------------------
# acceptance 1: one step equals diffusers + PEFT + AdamW
# ----------------------------------------------------------------------------------------------


def peft_reference(weights, lora, module_names, rank: int, alpha: float):
    """diffusers' WanTransformer3DModel with PEFT LoRA on the same layers, initialised from ``lora``."""
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    kwargs = {k: v for k, v in TRAIN_CONFIG.diffusers_config().items() if not k.startswith("_")}
    model = diffusers.WanTransformer3DModel(**kwargs).eval()
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(weights)), strict=True)
    model.requires_grad_(False)
    names = {n: official_to_diffusers_key(n + ".weight").removesuffix(".weight") for n in module_names}
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=sorted(names.values()))
    model = peft.inject_adapter_in_model(config, model)
    modules = dict(model.named_modules())
    pairs = {}
    for official, name in names.items():
        layer, ours = modules[name], lora.pair(official)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(ours.down)
            layer.lora_B["default"].weight.copy_(ours.up)
        pairs[official] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    return model, pairs


def test_one_training_step_matches_diffusers_with_peft_lora_and_adamw(comfy_host, weights):
    from velox.host.lora_training import (
        BatchDrawer,
        TrainableLora,
        TrainConfig,
        make_optimizer,
        target_modules,
        training_step,
        wan_velocity,
    )

    config = TrainConfig(rank=4, alpha=2.0, targets="attention_ffn", learning_rate=1e-3, batch_size=2,
                         grad_accumulation=2, seed=7)
    patcher = core_model(weights)
    model = patcher.model.diffusion_model.requires_grad_(False)
    modules = target_modules(model, "wan", config.targets)
    assert len(modules) == 2 * (8 + 2)  # q k v o of both attentions and ffn.0 / ffn.2, in 2 blocks
    lora = TrainableLora({n: (m.out_features, m.in_features) for n, m in modules.items()}, config.rank,
                         config.alpha, seed=config.seed)
    with torch.no_grad():  # a non-zero up, so both factors get a gradient on the first step
        for p in lora.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    reference, reference_pairs = peft_reference(weights, lora, list(modules), config.rank, config.alpha)
    drawer = BatchDrawer(synthetic_samples(3, seed=1), config, 8.0, torch.device("cpu"))
    batches = [drawer.draw() for _ in range(config.grad_accumulation)]
    assert all(b.sigma.min() > 0 and b.sigma.max() < 1 for b in batches)

    initial_up = {name: lora.pair(name).up.detach().clone() for name in modules}
    with lora.attached(modules):
        loss = training_step(wan_velocity(model, torch.float32), make_optimizer(lora, config), batches)

    def diffusers_velocity(x, t, context):
        return reference(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

    reference_params = [p for pair in reference_pairs.values() for p in pair]
    for p in reference_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(reference_params, lr=config.learning_rate, weight_decay=config.weight_decay)
    want_loss = training_step(diffusers_velocity, optimizer, batches)

    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name, (down, up) in reference_pairs.items():
        ours = lora.pair(name)
        assert relative_l2(ours.down, down) <= STEP_RTOL, name
        assert relative_l2(ours.up, up) <= STEP_RTOL, name
        assert relative_l2(ours.up, initial_up[name]) > 1e-4  # the step really moved it



# ----------------------------------------------------------------------------------------------
# acceptance 2: a memorised clip, saved, loaded by core and by Velox
# ----------------------------------------------------------------------------------------------


MEMORISE_STEPS = 150


def evaluation_loss(patcher, lora, config, samples) -> float:
    """The objective on 16 fixed draws (noise and sigma fixed by their own seed), LoRA attached."""
    from velox.host.lora_training import (
        BatchDrawer,
        flow_matching_loss,
        target_modules,
        wan_velocity,
    )

    model = patcher.model.diffusion_model
    drawer = BatchDrawer(samples, config, 8.0, torch.device("cpu"))
    drawer.generator.manual_seed(1234)
    modules = target_modules(model, "wan", config.targets)
    with torch.no_grad(), lora.attached(modules):
        return sum(flow_matching_loss(wan_velocity(model, torch.float32), drawer.draw()).item()
                   for _ in range(16)) / 16


def memorisable_clip():
    """One clip whose 2x2-patch tokens all repeat one random patch. Wan has no absolute position
    embedding (RoPE only), so a clip of distinct random tokens cannot be told apart by position and is
    not memorisable by a tiny model in a few hundred steps; a repeated pattern is (measured: the loss on
    random tokens stalls at -47 %, on this clip it reaches about -65 % in 150 steps)."""
    clip = synthetic_samples(1, seed=9)[0]
    clip.latent = clip.latent[:, :, :2, :2].repeat(1, 1, 2, 2).contiguous()
    return clip


@pytest.fixture(scope="module")
def memorised(comfy_host, weights, tmp_path_factory, one_cpu_thread):
    """(base MODEL, untrained LoRA, trained result, config, samples, saved file) of one training run."""
    from velox.host.lora_training import TrainableLora, TrainConfig, save_lora, train_lora, training_metadata

    config = TrainConfig(rank=8, alpha=8.0, targets="attention_ffn", learning_rate=3e-3, steps=MEMORISE_STEPS,
                         seed=3, weight_decay=0.0)
    patcher, samples = core_model(weights), [memorisable_clip()]
    result = train_lora(patcher, samples, config)
    shapes = {n: (result.lora.pair(n).up.shape[0], result.lora.pair(n).down.shape[1]) for n in result.lora.names}
    untrained = TrainableLora(shapes, config.rank, config.alpha, seed=config.seed)  # the run's own init
    path = tmp_path_factory.mktemp("loras") / "memorised.safetensors"
    save_lora(path, result.lora, training_metadata(config, "wan", result.losses, {"velox.base_model": "tiny"}))
    return patcher, untrained, result, config, samples, path


def test_loss_on_a_memorisable_clip_falls_by_more_than_half(memorised):
    patcher, untrained, result, config, samples, _ = memorised
    before = evaluation_loss(patcher, untrained, config, samples)
    after = evaluation_loss(patcher, result.lora, config, samples)
    assert len(result.losses) == MEMORISE_STEPS and not result.interrupted
    assert after <= 0.5 * before, f"evaluation loss {before:.4f} -> {after:.4f}"


def sample_wan(patcher, context: torch.Tensor) -> torch.Tensor:
    """4 Euler steps of core's KSampler at cfg 1 from fixed noise: (1, C, T, H, W)."""
    import comfy.sample

    noise = torch.randn((1, *LATENT_SHAPE), generator=torch.Generator().manual_seed(21))
    cond = [[context[None], {}]]
    return comfy.sample.sample(patcher, noise, 4, 1.0, "euler", "simple", cond, cond,
                               torch.zeros_like(noise), disable_pbar=True, seed=21)


def test_saved_lora_loads_the_same_through_core_and_velox_and_changes_the_output(memorised, monkeypatch):
    import folder_paths
    from safetensors import safe_open

    import nodes
    from velox.nodes.lora_nodes import VeloxLoraStack

    patcher, _, result, _, samples, path = memorised
    with safe_open(str(path), "pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.1.ffn.2.alpha" in keys and len(keys) == 3 * len(result.lora.names)
    assert metadata["velox.family"] == "wan" and metadata["velox.steps_done"] == str(MEMORISE_STEPS)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(path.parent)], folder_paths.supported_pt_extensions))
    core = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, path.name, 1.0)[0]
    velox = VeloxLoraStack.execute(patcher, path.name, 1.0, "None", 1.0, "None", 1.0, "None", 1.0).args[0]
    context = samples[0].context
    base, with_core, with_velox = (sample_wan(m, context) for m in (patcher, core, velox))
    assert torch.equal(with_core, with_velox)
    assert relative_l2(with_core, base) > 0.05


# ----------------------------------------------------------------------------------------------
# the nodes: dataset folder, training, interrupt, bad input
# ----------------------------------------------------------------------------------------------


class StubVae:
    """The VAE interface the dataset uses: Wan's (3-D latent, 4n + 1 frames), pooled 8x, 16 channels."""

    latent_dim = 3
    first_stage_model = torch.nn.Linear(2, 2)

    def encode(self, pixels):  # (T, H, W, 3) -> (1, 16, 1 + (T - 1) // 4, H / 8, W / 8)
        assert (len(pixels) - 1) % 4 == 0
        pooled = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), 8).mean(1)  # (T, h, w)
        return pooled[::4][None, None].repeat(1, 16, 1, 1, 1)


class StubClip:
    cond_stage_model = torch.nn.Linear(3, 3)

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        return [[torch.full((1, TEXT_TOKENS, TRAIN_CONFIG.text_dim), float(len(text))), {}]]


def write_dataset(folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", (40, 24), (20 * i, 100, 200)) for i in range(10)]
    frames[0].save(folder / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    (folder / "clip.txt").write_text("a moving colour")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "still.png")
    (folder / "still.txt").write_text("red")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


def test_dataset_trims_to_4n_plus_1_skips_bad_files_and_reuses_its_cache(comfy_host, tmp_path):
    from velox.host.training_data import DatasetSettings, build_dataset

    folder, settings = write_dataset(tmp_path / "data"), DatasetSettings(16, 16, 10.0, 33)
    samples, report = build_dataset(folder, StubVae(), StubClip(), settings, tmp_path / "cache")
    assert [s.name for s in samples] == ["clip.gif", "still.png"]
    assert samples[0].latent.shape == (16, 3, 2, 2) and samples[1].latent.shape == (16, 1, 2, 2)
    assert "clip.gif: 10 frames trimmed to 9 (4n + 1)" in report.text()
    assert report.skipped and report.skipped[0].startswith("broken.mp4: ")
    again, report = build_dataset(folder, StubVae(), StubClip(), settings, tmp_path / "cache")
    assert report.cached == ["clip.gif", "still.png"] and torch.equal(again[0].latent, samples[0].latent)


def test_dataset_refuses_an_empty_folder_and_one_with_only_undecodable_files(comfy_host, tmp_path):
    from velox.errors import VeloxLoadError
    from velox.host.training_data import DatasetSettings, build_dataset

    settings = DatasetSettings(16, 16, 16.0, 9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VeloxLoadError, match="empty: holds no image or video; expected a folder of images"):
        build_dataset(tmp_path / "empty", StubVae(), StubClip(), settings, tmp_path / "cache")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.webm").write_bytes(b"\x00" * 64)
    with pytest.raises(VeloxLoadError, match=r"bad: no file could be used: x.webm: "):
        build_dataset(tmp_path / "bad", StubVae(), StubClip(), settings, tmp_path / "cache")


@pytest.fixture
def loras_folder(comfy_host, tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    return folder


def train_node(patcher, **overrides):
    from velox.nodes.lora_training_nodes import VeloxTrainLora

    values = dict(lora_name="trained", rank=4, alpha=4.0, targets="attention", learning_rate=1e-3, steps=4,
                  batch_size=1, grad_accumulation=1, seed=0, lora_dtype="fp32", gradient_checkpointing=True,
                  expert="all", boundary=0.875, resume_from="None")
    values.update(overrides)
    return VeloxTrainLora.execute(patcher, synthetic_samples(2, seed=4), **values)


def test_train_node_writes_the_lora_with_its_settings_and_a_loss_image(weights, loras_folder, one_cpu_thread):
    from safetensors import safe_open

    output = train_node(core_model(weights))
    model, name, image, low_noise_model = output.args
    assert low_noise_model is None  # one model trained: no low-noise expert output
    assert name == "trained.safetensors" and image.shape == (1, 360, 640, 3)
    with safe_open(str(loras_folder / name), "pt") as file:
        metadata = file.metadata()
    assert metadata["velox.steps_done"] == "4" and '"gradient_checkpointing": true' in metadata["velox.config"]
    assert any(k.endswith("self_attn.q.weight") for k in model.patches)  # the output MODEL carries the LoRA


def test_interrupt_keeps_the_last_whole_step_and_resume_refuses_another_family(weights, loras_folder, monkeypatch,
                                                                               one_cpu_thread):
    import comfy.model_management
    import comfy.utils
    from safetensors import safe_open
    from safetensors.torch import save_file

    from velox.errors import VeloxLoadError

    def interrupt_after_third_step(value, total, preview, node_id=None):
        if value == 3:  # what the Cancel button does
            comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", interrupt_after_third_step)
    patcher = core_model(weights)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train_node(patcher, steps=50)
    with safe_open(str(loras_folder / "trained.safetensors"), "pt") as file:
        assert file.metadata()["velox.steps_done"] == "3"
    sana = {"diffusion_model.blocks.0.attn.qkv.lora_down.weight": torch.zeros(2, 8),
            "diffusion_model.blocks.0.attn.qkv.lora_up.weight": torch.zeros(24, 2)}
    save_file(sana, str(loras_folder / "sana_style.safetensors"))
    with pytest.raises(VeloxLoadError, match="sana_style.safetensors: is a LoRA of Sana but the model being "
                                             "trained is Wan"):
        train_node(patcher, resume_from="sana_style.safetensors")


@pytest.mark.parametrize("name, refused", [("my_lora", False), ("my lora.safetensors", False), ("../evil", True),
                                           ("sub/dir", True), ("..", True), ("a\\b", True), ("  ", True)])
def test_train_lora_name_must_be_a_plain_file_name(comfy_host, name, refused):
    from velox.nodes.lora_training_nodes import VeloxTrainLora

    problems = VeloxTrainLora.value_problems({"lora_name": name})
    assert bool(problems) == refused, problems

"""VideoCrafter / DynamiCrafter from GGUF and with the quantization selector, on the CPU.

Tiny UNet files (``tiny.videocrafter.TINY_UNETS`` under lvdm's ``model.diffusion_model.`` prefix, plus
a Resampler for DynamiCrafter; fp32, 4 frames of 8x8 latents) are converted by our converter (Q8_0, and
Q4_K where a row is whole 256-blocks); the reference is the GGUF's tensors dequantized and saved as
safetensors. Both go through the loaders: the UNet outputs must agree to a relative L2 of 1e-6
(dequantize-then-matmul in fp32 on identical values). A whole demo release (VAE, OpenCLIP text, CLIP
vision) converted to GGUF must still give its float models unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

FRAMES = 4
GGUF_TOLERANCE = 1e-6
NEVER_QUANTIZED = ("time_embed", "fps_embedding", "image_proj_model")  # plus every "emb_layers"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two spin-waiting threads make these tiny ops ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _resampler_config():
    """A Resampler the detector reads back (64-wide heads, 16 queries per frame) for 4 frames."""
    from velox.models.resampler import ResamplerConfig

    return ResamplerConfig(dim=32, depth=1, dim_head=64, heads=1, num_queries=16, embedding_dim=48, output_dim=32,
                           ff_mult=2, video_length=FRAMES)


def _tiny_unet_file(kind: str, seed: int) -> dict[str, torch.Tensor]:
    from velox.models.resampler import Resampler
    from velox.models.unet3d import UNet3D
    from velox.tiny.videocrafter import TINY_UNETS, deterministic_weights

    with torch.device("meta"):  # heads as wide as the 32-channel UNet: what the detector assumes
        unet = UNet3D(replace(TINY_UNETS[kind], num_head_channels=32))
        proj = Resampler(_resampler_config()) if kind == "dc512" else None
    shapes = {f"model.diffusion_model.{k}": v.shape for k, v in unet.state_dict().items()}
    if proj is not None:
        shapes.update({f"image_proj_model.{k}": v.shape for k, v in proj.state_dict().items()})
    return deterministic_weights(shapes, seed)


def _dequantized_copy(gguf, destination):
    from safetensors.torch import save_file

    from velox.host.quant_loading import read_gguf_weights
    from velox.host.quant_tensor import PackedWeight

    dense = {k: (v.dequantize(torch.float32) if isinstance(v, PackedWeight) else v).contiguous()
             for k, v in read_gguf_weights(gguf).items()}
    save_file(dense, str(destination))
    return destination


@pytest.fixture(scope="module")
def converted(tmp_path_factory, comfy_host):
    """{(kind, qtype): (gguf path, dequantized safetensors path, conversion report)}."""
    from safetensors.torch import save_file

    from velox.loaders.gguf_convert import convert_to_gguf

    folder = tmp_path_factory.mktemp("vc_gguf")
    files = {}
    for kind, seed in (("vc2", 0), ("dc512", 1)):
        source = folder / f"{kind}.safetensors"
        save_file(_tiny_unet_file(kind, seed), str(source))
        for qtype in ("Q8_0", "Q4_K"):
            gguf = folder / f"{kind}_{qtype}.gguf"
            report = convert_to_gguf(source, gguf, qtype)
            files[kind, qtype] = (gguf, _dequantized_copy(gguf, folder / f"{kind}_{qtype}.safetensors"), report)
    return files


def _unet_inputs(variant, device: str = "cpu") -> tuple[tuple, dict]:
    """Fixed diffusion-model inputs: noise, timestep, text tokens; fps and (I2V) CLIP-vision tokens."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, variant.unet.in_channels, FRAMES, 8, 8, generator=g)
    context = torch.randn(1, 77, variant.unet.context_dim, generator=g)
    extra = {"fps": torch.tensor([24.0])}
    if variant.is_i2v:
        extra["clip_vision_tokens"] = torch.randn(1, 5, variant.resampler.embedding_dim, generator=g)
    args = (x, torch.tensor([601.0]), context)
    return tuple(a.to(device) for a in args), {k: v.to(device) for k, v in extra.items()}


def _unet_output(model) -> torch.Tensor:
    args, kwargs = _unet_inputs(model.model.velox_variant)
    with torch.no_grad():
        return model.model.diffusion_model(*args, **kwargs)


def _quant_linears(model) -> dict:
    from velox.host.quant_ops import QuantLinear

    return {n: m for n, m in model.model.diffusion_model.named_modules() if isinstance(m, QuantLinear)}


def _never_quantized(name: str) -> bool:
    return name.startswith(NEVER_QUANTIZED) or "emb_layers" in name


@pytest.mark.parametrize("kind", ["vc2", "dc512"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_unet_matches_its_dequantized_safetensors(converted, kind, qtype):
    from gguf import GGMLQuantizationType as Q

    from velox.host.videocrafter_loading import load_videocrafter_checkpoint

    gguf, reference, report = converted[kind, qtype]
    assert report.type_counts().get(qtype, 0) > 0, report.type_counts()  # some rows are whole blocks
    model, clip, vae, vision, variant = load_videocrafter_checkpoint(gguf, dtype=torch.float32)
    want_model, *_, want_variant = load_videocrafter_checkpoint(reference, dtype=torch.float32)
    assert variant == want_variant and variant.key == kind and clip is vae is vision is None
    linears = _quant_linears(model)
    packed = [n for n, m in linears.items() if m.weight_kind == "gguf"]
    assert packed and all(linears[n].gguf_qtype == int(Q[qtype]) for n in packed)
    assert not any(_never_quantized(n) for n in packed)
    got, want = _unet_output(model), _unet_output(want_model)
    assert got.shape == want.shape == (1, 4, FRAMES, 8, 8) and torch.isfinite(got).all()
    assert _relative(got, want) <= GGUF_TOLERANCE


def test_gguf_of_a_whole_release_keeps_vae_clip_and_vision(tmp_path, comfy_host):
    """The converter keeps the VAE / text / vision towers float: they load as they were."""
    from safetensors.torch import save_file

    from velox.host.videocrafter_loading import load_videocrafter_checkpoint
    from velox.loaders.gguf_convert import convert_to_gguf
    from velox.tiny.videocrafter import demo_release_state_dict

    source = demo_release_state_dict("dc512", 2, torch.float32)
    save_file(source, str(tmp_path / "dynamicrafter_512.safetensors"))
    convert_to_gguf(tmp_path / "dynamicrafter_512.safetensors", tmp_path / "dynamicrafter_512.gguf", "Q8_0")
    model, clip, vae, vision, variant = load_videocrafter_checkpoint(tmp_path / "dynamicrafter_512.gguf")
    assert variant.key == "dc512" and any(m.weight_kind == "gguf" for m in _quant_linears(model).values())
    vae_sd = vae.first_stage_model.state_dict()  # core picks the VAE's / encoders' dtypes: compare in theirs
    assert all(_same(vae_sd[k[len("first_stage_model."):]], v) for k, v in source.items()
               if k.startswith("first_stage_model."))
    tokens = next(v for k, v in clip.cond_stage_model.state_dict().items() if k.endswith("token_embedding.weight"))
    assert _same(tokens, source["cond_stage_model.model.token_embedding.weight"])
    patch = vision.model.state_dict()["vision_model.embeddings.patch_embedding.weight"]
    assert _same(patch, source["embedder.model.visual.conv1.weight"])


def _same(loaded: torch.Tensor, source: torch.Tensor) -> bool:
    return torch.equal(loaded, source.to(loaded.dtype))


def test_unet_only_loader_takes_the_unet_of_a_gguf(converted):
    from velox.host.videocrafter_loading import load_videocrafter_unet

    gguf, reference, _ = converted["dc512", "Q8_0"]
    model, variant = load_videocrafter_unet(gguf, dtype=torch.float32)
    want, _ = load_videocrafter_unet(reference, dtype=torch.float32)
    assert variant.key == "dc512"
    assert _relative(_unet_output(model), _unet_output(want)) <= GGUF_TOLERANCE


def test_bare_unet_gguf_loads_without_the_lvdm_prefix(converted, tmp_path):
    """A UNet-only GGUF under bare names (city96's layout for UNets) loads as MODEL alone."""
    from velox.host.videocrafter_loading import load_videocrafter_checkpoint
    from velox.loaders.gguf_reader import read_gguf

    gguf, reference, _ = converted["vc2", "Q8_0"]
    bare = tmp_path / "vc2_unet_Q8_0.gguf"
    _rewrite_gguf(read_gguf(gguf), bare, lambda name: name.removeprefix("model.diffusion_model."))
    model, clip, vae, vision, variant = load_videocrafter_checkpoint(bare, dtype=torch.float32)
    want, *_ = load_videocrafter_checkpoint(reference, dtype=torch.float32)
    assert variant.key == "vc2" and clip is vae is vision is None
    assert any(m.weight_kind == "gguf" for m in _quant_linears(model).values())
    assert _relative(_unet_output(model), _unet_output(want)) <= GGUF_TOLERANCE


def _rewrite_gguf(contents, destination, rename) -> None:
    """The same tensors (bytes untouched) under new names; no metadata but reshaped tensors' shapes."""
    from velox.loaders.gguf_reader import ORIG_SHAPE_PREFIX
    from velox.loaders.gguf_writer import INT32, TensorPlan, Typed, write_gguf

    plans, metadata, data = [], {}, {}
    for name, record in contents.tensors.items():
        new, shape = rename(name), record.shape or (1,)
        stored = shape if len(shape) <= 4 and record.shape else (shape[0], record.n_elements // shape[0])
        if stored != record.shape:
            metadata[ORIG_SHAPE_PREFIX + new] = Typed(INT32, list(record.shape))
        plans.append(TensorPlan(new, record.qtype, tuple(stored)))
        data[new] = record.data.reshape(-1)
    write_gguf(destination, metadata, plans, lambda plan: data[plan.name])


@pytest.fixture(scope="module")
def dense_output(converted):
    from velox.host.videocrafter_loading import load_videocrafter_unet

    model, _ = load_videocrafter_unet(converted["dc512", "Q8_0"][1], dtype=torch.float32)
    return _unet_output(model)


# Relative L2 of the whole tiny DynamiCrafter UNet's output against fp32 weights. Per weight, fp8 e4m3
# rounds to 2^-4 relative and per-channel int8 to max / 254; through the UNet's ~40 quantized layers the
# output error compounds to (measured here) fp8 1.0e-1 (lowp, activations fp8 too: 1.4e-1) and int8 2.1e-2
# (lowp: 3.7e-2). Bounds are 1.5x those.
SELECTOR_BOUNDS = {("fp8_e4m3", "dequant"): 0.15, ("fp8_e4m3", "lowp"): 0.21,
                   ("int8", "dequant"): 0.032, ("int8", "lowp"): 0.056}


@pytest.mark.parametrize(("quantization", "compute"), list(SELECTOR_BOUNDS))
def test_quantization_selector_keeps_embedders_dense_and_stays_close(converted, dense_output, quantization,
                                                                     compute):
    from velox.host.videocrafter_loading import load_videocrafter_unet

    model, _ = load_videocrafter_unet(converted["dc512", "Q8_0"][1], dtype=torch.float32,
                                      quantization=quantization, quant_compute=compute)
    kind = {"fp8_e4m3": "fp8", "int8": "int8"}[quantization]
    linears = _quant_linears(model)
    quantized = {n for n, m in linears.items() if m.weight_kind == kind}
    assert any(".attn1.to_q" in n for n in quantized) and any(".ff.net." in n for n in quantized)
    never = [n for n in linears if _never_quantized(n)]
    assert never and not quantized & set(never)
    error = _relative(_unet_output(model), dense_output)
    assert 0 < error <= SELECTOR_BOUNDS[quantization, compute], error
    groups = {n: m.activation_group for n, m in linears.items() if m.activation_group}
    assert any(n.endswith(".attn1.to_k") and g.endswith(".attn1") for n, g in groups.items())
    assert not any(".ff.net." in n or n.endswith("to_out.0") for n in groups)


def _write_gguf(path, architecture: str | None, names: list[str]) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from velox.loaders.gguf_writer import TensorPlan, write_gguf

    metadata = {"general.architecture": architecture} if architecture else {}
    plans = [TensorPlan(name, int(Q.F32), (32, 32)) for name in names]
    write_gguf(path, metadata, plans, lambda plan: np.zeros(32 * 32, np.float32).view(np.uint8))


@pytest.mark.parametrize(("architecture", "names", "message"), [
    ("wan", ["blocks.0.self_attn.q.weight"], "holds a wan model"),
    ("sana", ["blocks.0.attn.qkv.weight"], "holds a sana model"),
    (None, ["head.modulation", "blocks.0.self_attn.q.weight"], "Wan transformer"),
    ("t5encoder", ["encoder.block.0.layer.0.SelfAttention.q.weight"], "holds a umt5 model"),
])
def test_gguf_of_another_family_is_refused_by_name(tmp_path, comfy_host, architecture, names, message):
    from velox.errors import VeloxLoadError
    from velox.host.videocrafter_loading import load_videocrafter_checkpoint, load_videocrafter_unet

    path = tmp_path / "other.gguf"
    _write_gguf(path, architecture, names)
    for load in (load_videocrafter_checkpoint, load_videocrafter_unet):
        with pytest.raises(VeloxLoadError, match=message) as error:
            load(path)
        assert "other.gguf" in str(error.value)


def test_loader_nodes_list_gguf_and_pass_the_selector(converted, tmp_path, monkeypatch):
    """Both loader nodes list .gguf files, end with the (optional) selector inputs and load through it."""
    import shutil

    import folder_paths

    from velox.nodes.videocrafter_nodes import VideoCrafterLoader, VideoCrafterUNetLoader

    nodes = {VideoCrafterLoader: ("checkpoints", "ckpt_name"), VideoCrafterUNetLoader: ("diffusion_models", "unet_name")}
    for key, _ in nodes.values():
        (tmp_path / key).mkdir()
        shutil.copy(converted["vc2", "Q8_0"][0], tmp_path / key / "vc2_Q8_0.gguf")
        monkeypatch.setitem(folder_paths.folder_names_and_paths, key,
                            ([str(tmp_path / key)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    try:
        for node, (_, first) in nodes.items():
            inputs = node.define_schema().inputs
            assert [i.id for i in inputs] == [first, "variant", "weight_dtype", "quantization", "quant_compute",
                                              "attention"]
            assert inputs[-1].optional and inputs[-2].optional and inputs[-3].optional
            assert "vc2_Q8_0.gguf" in inputs[0].options
        model = VideoCrafterUNetLoader.execute("vc2_Q8_0.gguf", "auto", "fp32").args[0]
        assert any(m.weight_kind == "gguf" for m in _quant_linears(model).values())
        outputs = VideoCrafterLoader.execute("vc2_Q8_0.gguf", "auto", "fp32", "int8", "lowp").args
        assert outputs[0].model.velox_variant.key == "vc2" and outputs[1:] == (None, None, None)
        # the converter kept 32x32 linears float (<= 1024 elements): those take int8, the rest stay GGUF
        kinds = {m.weight_kind for m in _quant_linears(outputs[0]).values()}
        assert {"gguf", "int8"} <= kinds
    finally:
        folder_paths.filename_list_cache.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gguf_unet_on_the_gpu_matches_the_cpu(converted):
    """Packed Q4_K / Q8_0 bytes move to the GPU and dequantize there (Triton) to the CPU's values."""
    from velox.host.videocrafter_loading import load_videocrafter_unet

    for kind in ("vc2", "dc512"):
        model, _ = load_videocrafter_unet(converted[kind, "Q4_K"][0], dtype=torch.float32)
        want = _unet_output(model)
        unet = model.model.diffusion_model.to("cuda")
        args, kwargs = _unet_inputs(model.model.velox_variant, "cuda")
        # fp32 on the GPU means no TF32, in matmuls and in cuDNN's convolutions (on by default there;
        # with it the H100 measured 1.0e-3)
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                got = unet(*args, **kwargs)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        assert _relative(got.cpu(), want) <= 1e-4, kind

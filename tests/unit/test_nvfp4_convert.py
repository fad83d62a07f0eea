"""Making NVFP4 files (issue 23): ``convert_to_gguf.py --format nvfp4`` writes core's ``comfy_quant``
NVFP4 safetensors from bf16 Wan and Sana checkpoints. The written tensors equal comfy-kitchen's
quantization of the same weights byte for byte, the layers kept in high precision are the GGUF
converter's, Velox's loaders read the file back, and ComfyUI 0.8.0's own loader (its venv, in a
subprocess) sees the layers as NVFP4 and computes what Velox computes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.loaders import nvfp4_convert
from velox.loaders.gguf_convert import choose_storage
from velox.loaders.gguf_families import FAMILIES, make_canonicalizer
from velox.loaders.nvfp4_convert import choose_nvfp4_storage, convert_to_nvfp4
from velox.tiny import sana as tiny_sana
from velox.tiny import wan as tiny_wan

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tests/unit/conftest.py

ROOT = Path(__file__).resolve().parents[2]
CORE_080_PYTHON = ROOT / ".venv-comfyui-0.8.0" / "bin" / "python"
CORE_080_HOST = ROOT / ".host" / "comfyui-0.8.0" / "ComfyUI"
PARITY = 1e-5  # relative L2, fp32 compute (issue 23 acceptance 2)
CORE_PARITY = 1e-6  # relative L2, core 0.8.0 vs Velox on the same file, fp32 compute (observed: 0, bit-equal)
QUANT_SUFFIXES = (".weight", ".weight_scale", ".weight_scale_2", ".comfy_quant")  # one nvfp4 layer's tensors
NVFP4_LAYERS = {"wan": 2 * 10, "sana": 3 * 7}  # per block: q k v o x2 + ffn.0 ffn.2; qkv proj q kv proj + 2 convs


def _quant_models():
    """tests/unit/test_quant_models.py: the tiny configs, inputs and helpers its parity tests use."""
    spec = importlib.util.spec_from_file_location("velox_test_quant_models_nvfp4",
                                                  Path(__file__).with_name("test_quant_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODELS = _quant_models()


@pytest.fixture(scope="module")
def kitchen():
    ck = pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout

    return ck, TensorCoreNVFP4Layout


def bf16(state_dict):
    return {k: v.to(torch.bfloat16) for k, v in state_dict.items()}


def wan_source(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bf16 Wan file in Comfy-Org's layout, and the canonical tensors it holds."""
    weights = bf16(tiny_wan.tiny_wan_state_dict(MODELS.WAN_CONFIG, seed=5))
    return tiny_wan.write_comfyui_file(weights, folder / "wan_bf16.safetensors"), weights


def sana_source(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bf16 Sana diffusers folder (separate to_q/to_k/to_v, 4-D 1x1 convs), and its canonical tensors."""
    weights = bf16(tiny_sana.tiny_sana_state_dict(MODELS.SANA_CONFIG, seed=5))
    weights.pop("pos_embed", None)  # the diffusers layout keeps no PE buffer for a 1024px model
    source = tiny_sana.write_diffusers_folder(folder / "sana_diffusers", MODELS.SANA_CONFIG, weights)
    return source, make_canonicalizer(FAMILIES["sana"], list(weights))(weights)


SOURCES = {"wan": wan_source, "sana": sana_source}


def read_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def nvfp4_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".comfy_quant") for k in tensors if k.endswith(".comfy_quant"))


def kitchen_dequantized(tensors: dict[str, torch.Tensor], kitchen) -> dict[str, torch.Tensor]:
    """The file's tensors with every nvfp4 layer replaced by comfy-kitchen's fp32 dequantization."""
    ck, _ = kitchen
    dense = dict(tensors)
    for layer in nvfp4_layers(tensors):
        codes, block, scale = (dense.pop(layer + suffix) for suffix in (".weight", ".weight_scale", ".weight_scale_2"))
        dense.pop(layer + ".comfy_quant")
        dense[layer + ".weight"] = ck.dequantize_nvfp4(codes, scale, block, torch.float32)
    return dense


@pytest.fixture(scope="module", params=sorted(SOURCES))
def converted(request, tmp_path_factory):
    """(family, converted file, the canonical bf16 tensors it came from, report)."""
    folder = tmp_path_factory.mktemp(f"nvfp4_{request.param}")
    source, canonical = SOURCES[request.param](folder)
    report = convert_to_nvfp4(source, folder / "nvfp4.safetensors")
    return request.param, report.path, canonical, report


# ----------------------------------------------------------------------------------------------
# the file against comfy-kitchen
# ----------------------------------------------------------------------------------------------


def test_converted_file_equals_kitchen_quantization_byte_for_byte(converted, kitchen):
    family, path, canonical, report = converted
    _, layout = kitchen
    tensors = read_file(path)
    layers = nvfp4_layers(tensors)
    assert len(layers) == NVFP4_LAYERS[family] and report.type_counts()["nvfp4"] == len(layers)
    for layer in layers:
        codes, params = layout.quantize(canonical[layer + ".weight"])
        assert torch.equal(tensors[layer + ".weight"], codes), layer
        assert torch.equal(tensors[layer + ".weight_scale"].view(torch.uint8), params.block_scale.view(torch.uint8))
        assert torch.equal(tensors[layer + ".weight_scale_2"].view(torch.int32), params.scale.view(torch.int32))
        assert json.loads(bytes(tensors[layer + ".comfy_quant"].tolist())) == {"format": "nvfp4"}
    kept = set(canonical) - {layer + ".weight" for layer in layers}
    quant_keys = {layer + suffix for layer in layers for suffix in QUANT_SUFFIXES}
    assert kept == set(tensors) - quant_keys
    for name in kept:  # lossless: bf16 as read, or widened to fp32 (1-D, small, modulation)
        assert tensors[name].dtype in (torch.bfloat16, torch.float32), name
        assert torch.equal(tensors[name].to(torch.bfloat16), canonical[name]), name


def test_nvfp4_layers_are_exactly_the_ones_the_gguf_converter_quantizes(converted):
    family, _, canonical, report = converted
    gguf = {name: choose_storage(FAMILIES[family], name, tensor, Q.Q8_0, None) for name, tensor in canonical.items()}
    # every side here is a multiple of 16; rows that are not whole Q8_0 blocks of 32 still are NVFP4 blocks
    gguf_quantized = {name for name, c in gguf.items() if c.qtype == Q.Q8_0 or "not whole Q8_0 blocks" in c.note}
    assert {choice.name for choice in report.tensors if choice.storage == "nvfp4"} == gguf_quantized
    modulation = [c for c in report.tensors if "modulation" in c.name or "scale_shift_table" in c.name]
    assert modulation and all(c.storage == "float32" for c in modulation)  # keep_f32, as in GGUF


@pytest.mark.parametrize(("name", "shape", "dtype", "storage", "note"), [
    ("blocks.0.ffn.0.weight", (64, 32), torch.bfloat16, "nvfp4", ""),
    ("blocks.0.ffn.0.weight", (40, 48), torch.bfloat16, "bfloat16", "not whole 16 x 16 tiles"),
    ("blocks.0.ffn.0.weight", (48, 40), torch.float16, "float16", "not whole 16 x 16 tiles"),
    ("blocks.0.ffn.0.weight", (64, 32), torch.float64, "nvfp4", ""),
    ("head.head.weight", (64, 256), torch.float64, "float32", "never-quantize list"),  # safetensors: no fp64 kept
    ("blocks.0.ffn.0.bias", (4096,), torch.bfloat16, "float32", ""),
    ("blocks.0.ffn.0.weight", (16, 32), torch.float16, "float16", ""),  # <= 1024 elements
    ("head.head.weight", (64, 256), torch.bfloat16, "bfloat16", "never-quantize list"),
    ("patch_embedding.weight", (256, 16, 1, 2, 2), torch.bfloat16, "bfloat16", "never-quantize list"),
])
def test_storage_rules_per_tensor(name, shape, dtype, storage, note):
    meta = torch.empty(shape, dtype=dtype, device="meta")
    choice = choose_nvfp4_storage(FAMILIES["wan"], name, meta)
    assert choice.storage == storage and note in choice.note


def test_groups_are_read_one_at_a_time_and_each_tensor_once(tmp_path, count_tensor_loads):
    source, _ = sana_source(tmp_path)
    loads = count_tensor_loads(nvfp4_convert)
    convert_to_nvfp4(source, tmp_path / "s.safetensors")
    assert sorted(loads) == sorted(set(loads))
    blocks = [int(n.split(".")[1]) for n in loads if n.startswith("transformer_blocks.")]
    assert blocks == sorted(blocks) and len(set(blocks)) == MODELS.SANA_CONFIG.depth


def test_cli_writes_nvfp4_next_to_the_source_and_refuses_other_families_and_quantized_sources(tmp_path, capsys):
    import convert_to_gguf as cli  # scripts/ is on sys.path (tests/conftest.py)

    source, _ = wan_source(tmp_path)
    assert cli.main([str(source), "--format", "nvfp4", "--quiet"]) == 0
    destination = tmp_path / "wan_bf16-NVFP4.safetensors"
    assert destination.is_file() and "20 nvfp4" in capsys.readouterr().out
    assert cli.main([str(destination), str(tmp_path / "again.safetensors"), "--format", "nvfp4"]) == 1
    assert "comfy_quant" in capsys.readouterr().err
    gemma = tmp_path / "gemma.safetensors"
    save_file({"layers.0.self_attn.q_proj.weight": torch.zeros(32, 32, dtype=torch.bfloat16)}, str(gemma))
    with pytest.raises(VeloxLoadError, match=r"gemma\.safetensors: is a gemma2 checkpoint.*a sana or wan"):
        convert_to_nvfp4(gemma, tmp_path / "gemma-NVFP4.safetensors")
    assert not (tmp_path / "gemma-NVFP4.safetensors").exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_conversion_writes_the_cpu_bytes(tmp_path):
    source, _ = wan_source(tmp_path)
    cpu = convert_to_nvfp4(source, tmp_path / "cpu.safetensors").path
    cuda = convert_to_nvfp4(source, tmp_path / "cuda.safetensors", device="cuda").path
    assert cpu.read_bytes() == cuda.read_bytes()


# ----------------------------------------------------------------------------------------------
# Velox's loaders read the file back
# ----------------------------------------------------------------------------------------------


def load_family(family: str, path: Path):
    from velox.host import sana_loading, wan_loading

    loaders = {"wan": wan_loading.load_wan_model, "sana": sana_loading.load_sana_model}
    return loaders[family](path, dtype=torch.float32)


RUN = {"wan": MODELS.run_wan, "sana": MODELS.run_sana}


def test_velox_loader_reads_the_file_as_kitchen_dequantized_weights(comfy_host, converted, kitchen, tmp_path):
    family, path, _, _ = converted
    nvfp4_model = load_family(family, path)
    assert MODELS.packed_kinds(nvfp4_model)["nvfp4"] == NVFP4_LAYERS[family]
    dense = kitchen_dequantized(read_file(path), kitchen)
    save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp_path / "dense.safetensors"))
    float_model = load_family(family, tmp_path / "dense.safetensors")
    run = RUN[family]
    assert MODELS.relative_l2(run(nvfp4_model), run(float_model)) <= PARITY


# ----------------------------------------------------------------------------------------------
# ComfyUI 0.8.0 core loads the file
# ----------------------------------------------------------------------------------------------

# Runs under the 0.8.0 venv: core's own loader, CPU args as tests/conftest.py sets them.
CORE_PROBE = '''
import sys

import torch

host, model_path, inputs_path, out_path = sys.argv[1:5]
sys.path.insert(0, host)
import comfy.options

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
import comfy.cli_args
import comfy.model_management
import comfy.sd
from comfy.quant_ops import QuantizedTensor

patcher = comfy.sd.load_diffusion_model(model_path)
model = patcher.model.diffusion_model
layouts = {name: m.weight._layout_cls for name, m in model.named_modules()
           if isinstance(getattr(m, "weight", None), QuantizedTensor)}
weights = {name: m.weight.dequantize() for name, m in model.named_modules() if name in layouts}
inputs = torch.load(inputs_path)
with torch.no_grad():
    out = model(inputs["x"], inputs["t"], inputs["context"])
torch.save({"layouts": layouts, "weights": weights, "out": out, "dtype": str(patcher.model.get_dtype())}, out_path)
'''


@pytest.fixture(scope="module")
def core_080():
    if not (CORE_080_PYTHON.is_file() and (CORE_080_HOST / "comfy").is_dir()):
        pytest.skip("no ComfyUI 0.8.0 host and venv (.venv-comfyui-0.8.0, .host/comfyui-0.8.0)")
    return CORE_080_PYTHON, CORE_080_HOST


def run_core_080(core_080, model_path: Path, inputs: dict, folder: Path) -> dict:
    python, host = core_080
    (folder / "probe.py").write_text(CORE_PROBE)
    torch.save(inputs, folder / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    done = subprocess.run([str(python), "-P", str(folder / "probe.py"), str(host), str(model_path),
                           str(folder / "inputs.pt"), str(folder / "out.pt")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "out.pt")


def test_core_080_loads_the_wan_file_as_nvfp4_and_computes_what_velox_computes(comfy_host, core_080, kitchen,
                                                                               tmp_path):
    source, _ = wan_source(tmp_path)
    path = convert_to_nvfp4(source, tmp_path / "wan-NVFP4.safetensors").path
    generator = torch.Generator().manual_seed(3)
    config = MODELS.WAN_CONFIG
    inputs = {"x": torch.randn(2, config.in_dim, 2, 4, 6, generator=generator), "t": MODELS.TIMESTEPS,
              "context": torch.randn(2, 16, config.text_dim, generator=generator)}
    core = run_core_080(core_080, path, inputs, tmp_path)
    tensors = read_file(path)
    assert core["layouts"] == dict.fromkeys(nvfp4_layers(tensors), "TensorCoreNVFP4Layout")
    dense = kitchen_dequantized(tensors, kitchen)
    for layer, weight in core["weights"].items():  # core dequantizes to its compute dtype (fp32 on the CPU)
        assert torch.equal(weight, dense[layer + ".weight"].to(weight.dtype)), layer
    velox = load_family("wan", path)
    with torch.no_grad():
        ours = velox.model.diffusion_model(inputs["x"], inputs["t"], inputs["context"])
    assert core["dtype"] == "torch.float32" and core["out"].shape == ours.shape
    assert MODELS.relative_l2(core["out"].float(), ours) <= CORE_PARITY

"""``host/quant_ops.py``: quantized Linears compute what a hand-built reference computes, follow the
never-quantize table, add the low-rank hook, and survive ModelPatcher (LoRA patch / unpatch, lowvram
patches, ``.to``) with their packed storage intact.

Tolerances: the dequant path is bit-exact with ``F.linear`` on the hand-dequantized weight (same ops);
LoRA merged into fp8 / int8 storage is compared with the float result at the storage's own rounding
error (relative L2 <= 4e-2 fp8, 2e-2 int8; measured 1.4e-2 int8: codes clamp at the old scale); unpatching restores the packed bytes exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

IN, OUT = 64, 48


@pytest.fixture(scope="module")
def quant(comfy_host):
    from velox.host import quant_ops, quant_tensor

    return quant_ops, quant_tensor


def make_layer(quant, quantization="none", compute="dequant", never=(), weight=None, bias=True, name="blocks.0.ffn.0"):
    quant_ops, _ = quant
    ops = quant_ops.make_quant_operations(quantization, compute, never)
    layer = ops.Linear(IN, OUT, bias=bias, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, IN, generator=generator) / 8 if weight is None else weight
    state = {f"{name}.weight": weight}
    if bias:
        state[f"{name}.bias"] = torch.randn(OUT, generator=generator) / 10
    holder = torch.nn.Module()
    parent = holder
    *path, leaf = name.split(".")
    for part in path:
        child = torch.nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, layer)
    missing, unexpected = holder.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return holder, layer, state


def inputs(seed=1):
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantization, kind, storage", [("fp8_e4m3", "fp8", torch.float8_e4m3fn),
                                                         ("int8", "int8", torch.int8)])
def test_dequant_path_equals_linear_on_the_hand_dequantized_weight(quant, quantization, kind, storage):
    _, layer, state = make_layer(quant, quantization)
    assert layer.weight_kind == kind and layer.weight.dtype == storage and layer.weight_scale.shape == (OUT,)
    weight = state["blocks.0.ffn.0.weight"]
    amax = weight.abs().amax(dim=1)
    scale = amax / (448.0 if kind == "fp8" else 127.0)
    assert torch.equal(layer.weight_scale, scale)
    by_hand = layer.weight.float() * scale[:, None]
    x = inputs()
    assert torch.equal(layer(x), F.linear(x, by_hand, state["blocks.0.ffn.0.bias"]))


def test_int8_weight_codes_are_rounded_by_hand(quant):
    _, layer, state = make_layer(quant, "int8")
    weight = state["blocks.0.ffn.0.weight"]
    scaled = weight / layer.weight_scale[:, None]
    by_hand = torch.where(scaled >= 0, scaled + 0.5, scaled - 0.5).trunc().clamp(-127, 127).to(torch.int8)
    assert torch.equal(layer.weight, by_hand)


@pytest.mark.parametrize("quantization", ["fp8_e4m3", "int8"])
def test_lowp_path_on_cpu_is_the_w8a8_twin(quant, quantization):
    from velox.kernels.fp8_linear import fp8_linear_emulated
    from velox.kernels.int8_gemm_torch import int8_linear_torch

    _, layer, state = make_layer(quant, quantization, compute="lowp")
    x = inputs()
    twin = fp8_linear_emulated if quantization == "fp8_e4m3" else int8_linear_torch
    want = twin(x, layer.weight, layer.weight_scale, layer.bias)
    assert torch.equal(layer(x), want)
    reference = F.linear(x, state["blocks.0.ffn.0.weight"], state["blocks.0.ffn.0.bias"])
    assert ((layer(x) - reference).norm() / reference.norm()) < 6e-2


def test_never_quantize_table_keeps_matching_layers_dense(quant):
    _, kept, _ = make_layer(quant, "fp8_e4m3", never=(r"^time_embedding\.",), name="time_embedding.0")
    _, quantized, _ = make_layer(quant, "fp8_e4m3", never=(r"^time_embedding\.",), name="blocks.0.ffn.0")
    assert kept.weight_kind == "dense" and kept.weight.dtype == torch.float32
    assert quantized.weight_kind == "fp8"


def test_gguf_packed_weight_dequantizes_in_forward(quant):
    import gguf.quants

    _, quant_tensor = quant
    weight = torch.randn(OUT, IN) / 8
    blocks = torch.from_numpy(gguf.quants.quantize(weight.numpy(), Q.Q8_0))
    packed = quant_tensor.PackedWeight(blocks, (OUT, IN), qtype=int(Q.Q8_0))
    _, layer, state = make_layer(quant, weight=packed)
    assert layer.weight_kind == "gguf" and layer.weight.dtype == torch.uint8 and layer.weight.shape == blocks.shape
    real = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q.Q8_0))
    x = inputs()
    assert torch.equal(layer(x), F.linear(x, real, state["blocks.0.ffn.0.bias"]))


def test_plain_fp8_checkpoint_weight_is_kept_as_fp8_with_unit_scale(quant):
    weight = (torch.randn(OUT, IN) / 8).to(torch.float8_e4m3fn)
    _, layer, _ = make_layer(quant, weight=weight, bias=False)
    assert layer.weight_kind == "fp8" and torch.equal(layer.weight_scale, torch.ones(OUT))
    x = inputs()
    assert torch.equal(layer(x), F.linear(x, weight.float()))


def test_velox_lowrank_output_is_added(quant):
    _, layer, _ = make_layer(quant, "int8")
    x = inputs()
    base = layer(x)
    assert layer.velox_lowrank is None
    layer.velox_lowrank = lambda t: torch.full((*t.shape[:-1], OUT), 0.25)
    assert torch.equal(layer(x), base + 0.25)


def test_module_to_dtype_keeps_packed_codes_and_fp32_scales(quant):
    holder, layer, _ = make_layer(quant, "fp8_e4m3")
    codes, scale = layer.weight.clone(), layer.weight_scale.clone()
    holder.to(torch.bfloat16)
    assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.bfloat16


def test_memory_is_counted_at_the_packed_size(quant, comfy_host):
    import comfy.model_management

    holder, layer, _ = make_layer(quant, "int8")
    assert comfy.model_management.module_size(layer) == OUT * IN * 1 + OUT * 4 + OUT * 4


# ----------------------------------------------------------------------------------------------
# ModelPatcher
# ----------------------------------------------------------------------------------------------


def patcher_for(holder):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(holder, load_device=cpu, offload_device=cpu)


def lora_diff(seed=7):
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed)) / 50


@pytest.mark.parametrize("quantization, bound", [("fp8_e4m3", 4e-2), ("int8", 2e-2)])
def test_model_patcher_merges_lora_into_scaled_storage_and_unpatches_exactly(quant, quantization, bound):
    holder, layer, state = make_layer(quant, quantization)
    codes, scale = layer.weight.clone(), layer.weight_scale.clone()
    real = layer.weight.float() * scale[:, None]
    patcher = patcher_for(holder)
    diff = lora_diff()
    assert patcher.add_patches({"blocks.0.ffn.0.weight": (diff,)}) == ["blocks.0.ffn.0.weight"]
    patcher.patch_model(device_to=torch.device("cpu"))
    assert layer.weight.dtype == codes.dtype and torch.equal(layer.weight_scale, scale)
    x = inputs()
    want = F.linear(x, real + diff, state["blocks.0.ffn.0.bias"])
    assert ((layer(x) - want).norm() / want.norm()) < bound
    patcher.unpatch_model(device_to=torch.device("cpu"))
    assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))


def test_model_patcher_patches_a_gguf_layer_dense_and_restores_its_blocks(quant):
    import gguf.quants

    _, quant_tensor = quant
    weight = torch.randn(OUT, IN) / 8
    blocks = torch.from_numpy(gguf.quants.quantize(weight.numpy(), Q.Q8_0))
    holder, layer, state = make_layer(quant, weight=quant_tensor.PackedWeight(blocks, (OUT, IN), qtype=int(Q.Q8_0)))
    real = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q.Q8_0))
    patcher = patcher_for(holder)
    diff = lora_diff()
    patcher.add_patches({"blocks.0.ffn.0.weight": (diff,)})
    patcher.patch_model(device_to=torch.device("cpu"))
    x = inputs()
    want = F.linear(x, real + diff, state["blocks.0.ffn.0.bias"])
    assert layer.weight_kind == "dense" and torch.allclose(layer(x), want, rtol=1e-5, atol=1e-6)
    patcher.unpatch_model(device_to=torch.device("cpu"))
    assert layer.weight_kind == "gguf" and torch.equal(layer.weight, blocks)
    assert torch.equal(layer(x), F.linear(x, real, state["blocks.0.ffn.0.bias"]))


@pytest.mark.parametrize("quantization", ["int8", "gguf"])
def test_lowvram_lora_patch_is_applied_to_the_dequantized_weight(quant, quantization):
    import gguf.quants

    _, quant_tensor = quant
    weight = torch.randn(OUT, IN) / 8
    if quantization == "gguf":
        blocks = torch.from_numpy(gguf.quants.quantize(weight.numpy(), Q.Q8_0))
        holder, layer, state = make_layer(quant, weight=quant_tensor.PackedWeight(blocks, (OUT, IN), int(Q.Q8_0)))
    else:
        holder, layer, state = make_layer(quant, quantization, weight=weight)
    x = inputs()
    real = layer.convert_weight(layer.weight.float())
    patcher = patcher_for(holder)
    diff = lora_diff()
    patcher.add_patches({"blocks.0.ffn.0.weight": (diff,)})
    stored = layer.weight.clone()
    patcher.load(torch.device("cpu"), lowvram_model_memory=1)  # nothing fits: every layer casts per call
    assert len(layer.weight_function) == 1 and torch.equal(layer.weight, stored)
    want = F.linear(x, real + diff, state["blocks.0.ffn.0.bias"])
    assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", ["fp8_e4m3", "int8", "gguf"])
def test_packed_layer_moves_to_the_gpu_and_back_and_computes_there(quant, quantization):
    import gguf.quants

    _, quant_tensor = quant
    if quantization == "gguf":
        weight = torch.randn(OUT, IN) / 8
        blocks = torch.from_numpy(gguf.quants.quantize(weight.numpy(), Q.Q8_0))
        holder, layer, state = make_layer(quant, weight=quant_tensor.PackedWeight(blocks, (OUT, IN), int(Q.Q8_0)))
    else:
        holder, layer, state = make_layer(quant, quantization, compute="lowp")
    stored = layer.weight.clone()
    x = inputs()
    cpu_out = layer(x)
    holder.to("cuda")
    assert layer.weight.is_cuda and layer.weight.dtype == stored.dtype
    gpu_out = layer(x.cuda().bfloat16()).float().cpu()
    assert ((gpu_out - cpu_out).norm() / cpu_out.norm()) < 2e-2  # bf16 activations (and W8A8 on the GPU)
    holder.to("cpu")
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_fused_dequant_gemm_switch_gives_the_dequant_paths_result(quant, monkeypatch, qtype):
    quant_ops, quant_tensor = quant
    weight = torch.randn(OUT, 256) / 16
    packed = quant_tensor.quantize_weight_gguf(weight, qtype)
    ops = quant_ops.make_quant_operations()
    layer = ops.Linear(256, OUT, bias=False, dtype=torch.bfloat16)
    layer.load_state_dict({"weight": packed}, strict=False)
    layer.to("cuda")
    x = torch.randn(2, 9, 256, device="cuda", dtype=torch.bfloat16)
    unfused = layer(x)
    monkeypatch.setitem(quant_ops.FUSED_DEQUANT_GEMM_MAX_TOKENS, int(qtype), 4096)
    assert layer._fused(x)
    fused = layer(x)
    assert ((fused.float() - unfused.float()).norm() / unfused.float().norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", ["gguf_q8_0", "gguf_q4_k", "fp8_e4m3"])
def test_quantized_layer_under_torch_compile_equals_eager(quant, quantization):
    """What core's TorchCompileModel does to a MODEL: the traced forward calls the Triton kernels
    through Triton's own launcher (the direct launch reads data pointers, which tracing has none of)."""
    quant_ops, quant_tensor = quant
    weight = torch.randn(OUT, 256) / 16
    if quantization.startswith("gguf"):
        qtype = Q.Q8_0 if quantization == "gguf_q8_0" else Q.Q4_K
        ops, state = quant_ops.make_quant_operations(), {"weight": quant_tensor.quantize_weight_gguf(weight, qtype)}
    else:
        ops, state = quant_ops.make_quant_operations(quantization, "dequant"), {"weight": weight}
    layer = ops.Linear(256, OUT, bias=False, dtype=torch.bfloat16)
    layer.load_state_dict(state, strict=False)
    layer.to("cuda")
    x = torch.randn(2, 9, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = [layer(x) for _ in range(2)]  # the second call takes the direct launch
        torch._dynamo.reset()
        compiled = torch.compile(layer)(x)
    assert torch.equal(eager[0], eager[1])
    assert ((compiled.float() - eager[0].float()).norm() / eager[0].float().norm()) < 1e-3


class _SharedInputAttention(torch.nn.Module):
    """Core Wan self-attention's calling pattern: q, k and v on one input tensor."""

    def __init__(self, ops):
        super().__init__()
        self.q, self.k, self.v = (ops.Linear(IN, IN, dtype=torch.float32) for _ in range(3))

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


@pytest.mark.parametrize("quantization", ["fp8_e4m3", "int8"])
def test_siblings_reuse_one_activation_quantization_and_compute_the_same(quant, quantization, monkeypatch):
    from velox.host import quant_ops
    from velox.host.shared_activation import SHARED_INPUT

    def build(shared):
        holder = torch.nn.Module()
        holder.add_module("blocks", torch.nn.ModuleList())
        ops = quant_ops.make_quant_operations(quantization, "lowp", shared_input=SHARED_INPUT["wan"] if shared else ())
        holder.blocks.append(torch.nn.Module())
        holder.blocks[0].add_module("self_attn", _SharedInputAttention(ops))
        generator = torch.Generator().manual_seed(3)
        holder.load_state_dict({f"blocks.0.self_attn.{n}.{p}": torch.randn(*((IN, IN) if p == "weight" else (IN,)),
                                                                            generator=generator) / 8
                                for n in "qkv" for p in ("weight", "bias")})
        return holder.blocks[0].self_attn

    shared, separate = build(True), build(False)
    assert shared.k.activation_group == "blocks.0.self_attn" and separate.k.activation_group is None
    calls = []
    for name in ("quantize_fp8_rows", "quantize_int8_rows"):
        original = getattr(quant_ops, name)
        monkeypatch.setattr(quant_ops, name, lambda rows, original=original: calls.append(rows) or original(rows))
    x = inputs()
    with torch.inference_mode():
        together = shared(x)
        assert len(calls) == 1  # q quantized x; k and v reused it
        apart = separate(x)
        assert len(calls) == 4
        again = shared(x.clone())  # another tensor, even with the same values: quantized again
        assert len(calls) == 5
    for a, b, c in zip(together, apart, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", ["fp8_e4m3", "int8"])
def test_siblings_sharing_one_quantization_on_gpu_equal_separate_layers(quant, quantization):
    from velox.host import quant_ops
    from velox.host.shared_activation import SHARED_INPUT

    generator = torch.Generator().manual_seed(4)
    state = {f"{n}.{p}": torch.randn(*((256, 256) if p == "weight" else (256,)), generator=generator) / 16
             for n in "qkv" for p in ("weight", "bias")}
    outputs = []
    for shared in (SHARED_INPUT["wan"], ()):
        ops = quant_ops.make_quant_operations(quantization, "lowp", shared_input=shared)
        attention = torch.nn.Module()
        for n in "qkv":
            attention.add_module(n, ops.Linear(256, 256, dtype=torch.bfloat16))
        holder = torch.nn.Module()
        holder.add_module("self_attn", attention)
        holder.load_state_dict({f"self_attn.{k}": v for k, v in state.items()})
        holder.to("cuda")
        x = torch.randn(2, 300, 256, generator=torch.Generator().manual_seed(5)).cuda().bfloat16()
        with torch.inference_mode():
            outputs.append([getattr(attention, n)(x) for n in "qkv"])
    assert attention.q.activation_group is None
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_shared_activation_is_dropped_with_its_input(quant):
    import gc

    from velox.host import shared_activation

    x = torch.randn(4, 8)
    shared_activation.quantized_activation(x, "blocks.0.self_attn", lambda rows: (rows * 2, rows.amax(-1)))
    assert shared_activation._last is not None
    del x
    gc.collect()
    assert shared_activation._last is None

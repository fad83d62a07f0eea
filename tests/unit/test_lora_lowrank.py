"""Unmerged LoRAs on quantized layers: ``LowRankSide`` against the merge-then-run reference, through
the stack on a tiny Wan model whose layers are stand-ins for ``host/quant_ops.py`` (INT8 and FP8
per-channel weights dequantized in forward, ``velox_lowrank`` added to the output)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from velox.host.lowrank import LowRankSide
from velox.loaders.lora_formats import LowRankFactors, lora_state_dict
from velox.tiny.wan import TINY_WAN_CONFIGS, tiny_wan_state_dict

QUANTIZED = {"blocks.0.self_attn.q": torch.int8, "blocks.1.cross_attn.v": torch.float8_e4m3fn}


class QuantizedLinearStandIn(torch.nn.Linear):
    """A Linear whose weight is stored quantized with a per-output-channel scale, as quant_ops stores it."""

    velox_lowrank = None

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
        layer = cls(linear.in_features, linear.out_features, bias=True)
        layer.weight = torch.nn.Parameter(qweight, requires_grad=False)
        layer.register_buffer("weight_scale", scale)
        layer.bias = torch.nn.Parameter(bias.to(linear.bias.dtype), requires_grad=False)
        return layer

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch.nn.functional.linear(x, self.dequantized().to(x.dtype), bias)
        if self.velox_lowrank is not None:
            out = out + self.velox_lowrank(x)
        return out


def dyadic(shape, generator, values=(-1.0, 0.0, 0.0, 0.0, 1.0)) -> torch.Tensor:
    """Sparse small dyadic numbers: every product and sum below is exact in bf16."""
    table = torch.tensor(values)
    return table[torch.randint(len(values), shape, generator=generator)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_low_rank_side_is_the_scaled_sum_of_products_in_fp32():
    generator = torch.Generator().manual_seed(0)
    terms = [(torch.randn(r, 24, generator=generator), torch.randn(40, r, generator=generator), s)
             for r, s in [(4, 0.5), (8, -1.25), (2, 3.0)]]
    x = torch.randn(3, 5, 24, generator=generator)
    want = sum(s * (x @ down.T) @ up.T for down, up, s in terms)
    side = LowRankSide(terms)
    assert side.rank == 14 and side(x).shape == (3, 5, 40)
    assert relative_error(side(x), want) < 1e-6
    assert relative_error(side.extended(terms[:1])(x), want + terms[0][2] * (x @ terms[0][0].T) @ terms[0][1].T) < 1e-6


def test_low_rank_side_follows_the_input_dtype_and_caches_per_dtype():
    side = LowRankSide([(torch.ones(2, 8), torch.ones(4, 2), 0.5)])
    assert side(torch.ones(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert side(torch.ones(1, 8)).dtype == torch.float32 and len(side._cache) == 2
    assert torch.equal(side(torch.ones(1, 8)), torch.full((1, 4), 8.0))


def test_low_rank_side_refuses_factors_of_different_ranks():
    with pytest.raises(ValueError, match=r"down \(4, 8\) and up \(6, 3\)"):
        LowRankSide([(torch.ones(4, 8), torch.ones(6, 3), 1.0)])


@pytest.fixture()
def quantized_wan(comfy_host):
    """Tiny Wan in bf16 with two layers swapped for quantized stand-ins holding dyadic weights."""
    import comfy.utils

    from velox.host.wan_loading import build_wan_model
    from velox.loaders.wan_detect import sniff_wan

    variant, state_dict = sniff_wan(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=0))
    patcher = build_wan_model(state_dict, variant, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    for module, dtype in QUANTIZED.items():
        linear = comfy.utils.get_attr(patcher.model.diffusion_model, module)
        q = torch.randint(-3, 4, linear.weight.shape, generator=generator).to(dtype)
        scale = torch.tensor([0.5, 1.0, 2.0])[torch.randint(3, (linear.out_features,), generator=generator)]
        parent, name = module.rsplit(".", 1)
        setattr(comfy.utils.get_attr(patcher.model.diffusion_model, parent), name,
                QuantizedLinearStandIn.from_dense(linear, q, scale, 0.5 * dyadic(linear.bias.shape, generator)))
    return patcher


def dyadic_loras(tmp_path, generator):
    """Two LoRAs (rank 4): strength 1 * alpha 4 / 4 and strength 0.25 * alpha 8 / 4, plus a merged layer."""
    specs = [("a.safetensors", 4.0, 1.0), ("b.safetensors", 8.0, 0.25)]
    items, factors = [], []
    for name, alpha, strength in specs:
        pairs = {m: LowRankFactors(dyadic((4, 256), generator).bfloat16(), dyadic((256, 4), generator).bfloat16(),
                                   alpha) for m in [*QUANTIZED, "blocks.0.self_attn.k"]}
        save_file(lora_state_dict(pairs, "kohya_fun"), str(tmp_path / name))
        items.append((tmp_path / name, strength))
        factors.append((pairs, strength))
    return items, factors


def reference_output(layer: QuantizedLinearStandIn, factors, module: str, x: torch.Tensor) -> torch.Tensor:
    """Dequantize, add the merged delta in fp32, run in bf16."""
    weight = layer.dequantized() + sum(strength * pairs[module].delta() for pairs, strength in factors)
    return torch.nn.functional.linear(x, weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16))


def test_quantized_layers_get_unmerged_side_products_equal_to_the_merged_reference(quantized_wan, tmp_path):
    import comfy.utils

    from velox.host.lora_stack import StackItem, apply_lora_stack

    generator = torch.Generator().manual_seed(2)
    items, factors = dyadic_loras(tmp_path, generator)
    model, _, reports = apply_lora_stack(quantized_wan, None, [StackItem(p, s) for p, s in items])
    assert [(r.merged, r.unmerged, r.unmatched) for r in reports] == [(1, 2, []), (1, 2, [])]
    assert set(model.patches) == {"diffusion_model.blocks.0.self_attn.k.weight"}  # the bf16 layer merges
    x = dyadic((2, 7, 256), generator).bfloat16()
    model.patch_model(device_to=torch.device("cpu"))
    try:
        for module in QUANTIZED:
            layer = comfy.utils.get_attr(model.model.diffusion_model, module)
            assert isinstance(layer.velox_lowrank, LowRankSide) and layer.velox_lowrank.rank == 8
            got, want = layer(x), reference_output(layer, factors, module, x)
            assert relative_error(got, want) <= 1e-3, module
            assert torch.equal(got, want), "dyadic data: both paths are exact"
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))
    assert all(comfy.utils.get_attr(quantized_wan.model.diffusion_model, m).velox_lowrank is None for m in QUANTIZED)


def test_side_products_on_random_data_are_as_accurate_as_the_merged_reference(quantized_wan, tmp_path):
    """Random weights: fp32 activations agree to 1e-5; in bf16 both paths carry bf16 rounding (about
    2e-3 each against the exact fp32 result), so they are compared with the exact result instead."""
    import comfy.utils

    from velox.host.lora_stack import StackItem, apply_lora_stack

    generator = torch.Generator().manual_seed(3)
    pairs = {m: LowRankFactors(torch.randn(16, 256, generator=generator) / 16,
                               torch.randn(256, 16, generator=generator) / 4, 8.0) for m in QUANTIZED}
    save_file(lora_state_dict(pairs, "official"), str(tmp_path / "r.safetensors"))
    model, _, _ = apply_lora_stack(quantized_wan, None, [StackItem(tmp_path / "r.safetensors", 0.7)])
    x = torch.randn(4, 256, generator=generator)
    model.patch_model(device_to=torch.device("cpu"))
    try:
        for module in QUANTIZED:
            layer = comfy.utils.get_attr(model.model.diffusion_model, module)
            weight = layer.dequantized() + 0.7 * pairs[module].delta()
            exact = torch.nn.functional.linear(x, weight, layer.bias.float())
            assert relative_error(layer(x), exact) < 1e-5
            reference = reference_output(layer, [(pairs, 0.7)], module, x.bfloat16())
            ours = layer(x.bfloat16())
            assert relative_error(ours, exact) <= 1.5 * relative_error(reference, exact) + 1e-4
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))


LOHA = {"hada_w1_a": (256, 2), "hada_w1_b": (2, 256), "hada_w2_a": (256, 2), "hada_w2_b": (2, 256)}


@pytest.mark.parametrize("kind, tensors", [("loha", LOHA), ("diff", {"diff": (256, 256)})])
def test_non_low_rank_patches_on_a_quantized_layer_are_refused_not_merged(quantized_wan, tmp_path, kind, tensors):
    from velox.errors import VeloxLoadError
    from velox.host.lora_stack import StackItem, apply_lora_stack

    save_file({f"diffusion_model.blocks.0.self_attn.q.{n}": torch.ones(s) for n, s in tensors.items()},
              str(tmp_path / f"{kind}.safetensors"))
    with pytest.raises(VeloxLoadError, match=f"{kind} patch on the quantized layer blocks.0.self_attn.q.weight"):
        apply_lora_stack(quantized_wan, None, [StackItem(tmp_path / f"{kind}.safetensors", 1.0)])


def test_real_quant_ops_int8_layers_take_the_side_product(comfy_host, tmp_path):
    """The same contract with ``host/quant_ops.py``'s own INT8 Linear (skipped while that file is absent)."""
    import comfy.utils

    from velox.host.lora_stack import StackItem, apply_lora_stack

    quant_models = pytest.importorskip("velox.host.quant_models")
    patcher = quant_models.build_quantized_wan(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=0),
                                               dtype=torch.float32, quantization="int8")
    module = "blocks.0.self_attn.q"
    layer = comfy.utils.get_attr(patcher.model.diffusion_model, module)
    if layer.weight.dtype != torch.int8:
        pytest.skip(f"quant_ops kept {module} as {layer.weight.dtype}")
    generator = torch.Generator().manual_seed(4)
    pairs = {module: LowRankFactors(torch.randn(8, 256, generator=generator) / 16,
                                    torch.randn(256, 8, generator=generator) / 3, 4.0)}
    save_file(lora_state_dict(pairs, "kohya_fun"), str(tmp_path / "q.safetensors"))
    model, _, (report,) = apply_lora_stack(patcher, None, [StackItem(tmp_path / "q.safetensors", 0.8)])
    assert (report.merged, report.unmerged) == (0, 1) and not model.patches
    x = torch.randn(3, 256, generator=generator)
    base = layer(x)
    model.patch_model(device_to=torch.device("cpu"))
    try:
        got = comfy.utils.get_attr(model.model.diffusion_model, module)(x)
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))
    want = base + x @ (0.8 * pairs[module].delta()).T
    assert relative_error(got, want) < 1e-5


def test_chained_stacks_extend_the_side_product_and_leave_the_first_model_alone(quantized_wan, tmp_path):
    from comfy.patcher_extension import CallbacksMP

    from velox.host.lora_stack import StackItem, apply_lora_stack

    items, _ = dyadic_loras(tmp_path, torch.Generator().manual_seed(5))
    first, _, _ = apply_lora_stack(quantized_wan, None, [StackItem(*items[0])])
    second, _, _ = apply_lora_stack(first, None, [StackItem(*items[1])])
    attribute = "diffusion_model.blocks.0.self_attn.q.velox_lowrank"
    assert first.object_patches[attribute].rank == 4 and second.object_patches[attribute].rank == 8
    assert attribute not in quantized_wan.object_patches
    side = second.object_patches[attribute]
    side(torch.ones(1, 256))
    assert side._cache
    for callback in second.get_all_callbacks(CallbacksMP.ON_DETACH):
        callback(second, True)
    assert not side._cache, "detaching the model drops the side products' device copies"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_side_product_on_a_wan_14b_sized_quantized_layer_on_cuda(comfy_host, quant):
    """quant_ops' Linear at 5120 x 5120 with 4 stacked rank-128 LoRAs on the GPU: fp32 activations equal
    the dequantize + merged-delta reference to 1e-4 (TF32 off)."""
    quant_ops = pytest.importorskip("velox.host.quant_ops")
    from velox.host.quant_tensor import quantize_weight

    g = torch.Generator("cuda").manual_seed(0)
    layer = quant_ops.make_quant_operations("none").Linear(5120, 5120, bias=True, device="cuda", dtype=torch.float32)
    layer.bias.data.zero_()
    assert layer._take_weight(quantize_weight(torch.randn(5120, 5120, device="cuda", generator=g) * 0.02, quant),
                              None, "test") is None
    terms = [(torch.randn(128, 5120, device="cuda", generator=g) * 0.02,
              torch.randn(5120, 128, device="cuda", generator=g) * 0.02, 0.5 * 64 / 128) for _ in range(4)]
    x = torch.randn(1024, 5120, device="cuda", generator=g)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        with torch.no_grad():
            base = layer(x)
            layer.velox_lowrank = LowRankSide(terms)
            got = layer(x)
            want = base + x @ sum(s * up @ down for down, up, s in terms).T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert relative_error(got, want) < 1e-4


def random_q4_k(shape: tuple[int, int], generator: torch.Generator):
    """A valid GGUF Q4_K weight of random blocks (finite fp16 scales), as ``quant_tensor.PackedWeight``."""
    from gguf import GGMLQuantizationType

    from velox.host.quant_tensor import PackedWeight
    from velox.kernels.gguf_types import FP16_FIELDS, block_layout

    block_size, type_size = block_layout(GGMLQuantizationType.Q4_K)
    count = shape[0] * shape[1] // block_size
    blocks = torch.randint(0, 256, (count, type_size), dtype=torch.uint8, generator=generator)
    for offset in FP16_FIELDS[GGMLQuantizationType.Q4_K]:
        blocks[:, offset:offset + 2] = (torch.rand(count, 1, generator=generator) * 1e-3).half().view(torch.uint8)
    return PackedWeight(blocks.view(shape[0], -1), shape, qtype=int(GGMLQuantizationType.Q4_K))


def test_real_quant_ops_gguf_q4_k_layer_takes_the_side_product_despite_its_packed_shape(comfy_host, tmp_path):
    """A GGUF layer's stored weight is (rows, bytes): the stack checks the LoRA against (out, in)."""
    import comfy.utils

    from velox.host.lora_stack import StackItem, apply_lora_stack

    quant_models = pytest.importorskip("velox.host.quant_models")
    generator = torch.Generator().manual_seed(6)
    weights = dict(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=0))
    module = "blocks.1.self_attn.o"
    weights[f"{module}.weight"] = random_q4_k((256, 256), generator)
    patcher = quant_models.build_quantized_wan(weights, dtype=torch.float32)
    layer = comfy.utils.get_attr(patcher.model.diffusion_model, module)
    assert tuple(layer.weight.shape) != (256, 256), "the packed bytes, not the logical shape"
    pairs = {module: LowRankFactors(torch.randn(4, 256, generator=generator) / 16,
                                    torch.randn(256, 4, generator=generator) / 2, 2.0)}
    save_file(lora_state_dict(pairs, "peft"), str(tmp_path / "g.safetensors"))
    model, _, (report,) = apply_lora_stack(patcher, None, [StackItem(tmp_path / "g.safetensors", 1.5)])
    assert (report.merged, report.unmerged, report.unmatched) == (0, 1, [])
    x = torch.randn(5, 256, generator=generator)
    base = layer(x)
    model.patch_model(device_to=torch.device("cpu"))
    try:
        got = comfy.utils.get_attr(model.model.diffusion_model, module)(x)
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))
    assert relative_error(got, base + x @ (1.5 * pairs[module].delta()).T) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_to_accumulates_into_the_output_as_the_sum_does(dtype):
    from velox.host.lowrank import LowRankSide

    g = torch.Generator().manual_seed(0)
    terms = [(torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 0.5),
             (torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), -1.25)]
    side = LowRankSide(terms, bias=torch.randn(8, generator=g))
    x = torch.randn(3, 5, 16, generator=g).to(dtype)
    out = torch.randn(3, 5, 8, generator=g).to(dtype)
    want = out + side(x)
    got = side.add_to(out.clone(), x)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance)

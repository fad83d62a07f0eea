"""An ``operations`` namespace whose Linear holds dense, GGUF-packed, FP8, INT8 or NVFP4 weights.

Built like ``comfy.ops.manual_cast`` (which provides every other op: convs, norms, embeddings stay
high precision and cast per call). The Linear:

- loads whatever the state dict holds for it: a float tensor (quantized at load when the namespace
  asks for fp8 / int8 and the layer is not on the family's never-quantize list), a
  ``PackedWeight`` (GGUF blocks, fp8 / int8 + per-channel scale) or a plain fp8 tensor (scale 1);
- computes by ``dequant`` (the weight dequantized to the input's dtype, then ``F.linear``; any
  device) or ``lowp`` (W8A8 with per-token activation scales: FP8 through ``torch._scaled_mm`` on
  SM 9.0+, INT8 through ``kernels/int8_gemm_triton.py`` on CUDA; on the CPU the same numerics in
  PyTorch; a GPU without the fast path dequantizes). GGUF weights always dequantize (their blocks
  have no W8A8 form; Q8_0 / Q4_K can use the fused dequant-GEMM, ``FUSED_DEQUANT_GEMM_MAX_TOKENS``);
  NVFP4 weights compute as ``host/nvfp4_compute.py`` picks per device (core's comfy-kitchen on FP4
  GPUs, the Triton dequant-GEMM or, for many rows, the Triton dequant + cuBLAS on other CUDA GPUs,
  dequantize-then-GEMM on the CPU);
- adds ``self.velox_lowrank(x)`` to its output when set (LoRA side products, attached through
  ModelPatcher object patches, so a quantized weight is never dequantized-and-merged per step);
- stays friendly to ModelPatcher: plain tensors for ``.to`` and partial (lowvram) loading, memory
  counted at the packed size, lowvram LoRA patches applied to the dequantized weight, and
  ``convert_weight`` / ``set_weight`` for merged LoRA patches (fp8 / int8 requantize under their
  scale; a patched GGUF layer is held dense until ModelPatcher restores its packed bytes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import comfy.lora
import comfy.model_patcher
import comfy.ops
import torch
import torch.nn.functional as F

from ..kernels import gguf_dequant_gemm_triton, int8_gemm_triton, nvfp4_torch
from ..kernels.fp8_linear import (
    FP8_DTYPE,
    fp8_linear_emulated,
    fp8_linear_scaled_mm,
    fp8_row_quantizer,
    quantize_fp8_rows,
    scaled_mm_supported,
)
from ..kernels.int8_gemm_torch import int8_linear_torch, quantize_int8_rows
from .nvfp4_compute import nvfp4_linear
from .quant_tensor import (
    QUANTIZE_TO,
    PackedWeight,
    dequantize_weight,
    kind_of,
    per_channel_scale,
    quantize_weight,
    requantize_with_scale,
)
from .shared_activation import group_of, quantized_activation

QUANT_COMPUTES = ("dequant", "lowp")
MATH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# GGML type -> the most tokens per call at which a layer runs the fused dequant-GEMM kernel (0: never).
# Off until bench/bench_quant_linear.py shows where it beats dequantize-then-GEMM on the target GPU.
FUSED_DEQUANT_GEMM_MAX_TOKENS = {gguf_dequant_gemm_triton.Q8_0: 0, gguf_dequant_gemm_triton.Q4_K: 0}


def make_quant_operations(quantization: str = "none", compute: str = "dequant",
                          never_quantize: Sequence[str] = (), base=comfy.ops.manual_cast,
                          shared_input: Sequence[str] = ()):
    """The namespace for a model's ``operations`` argument.

    quantization: ``none`` / ``fp8_e4m3`` / ``int8`` / ``nvfp4``, what float Linear weights become at load;
    compute: ``dequant`` / ``lowp``; never_quantize: regular expressions matched (``re.search``)
    against a layer's name (``blocks.3.ffn.0``) to keep it in high precision; shared_input: the
    family's ``shared_activation.SHARED_INPUT`` (sibling layers quantize one input once under lowp).
    """
    if quantization not in QUANTIZE_TO:
        raise ValueError(f"quantization must be one of {list(QUANTIZE_TO)}, got {quantization!r}")
    if compute not in QUANT_COMPUTES:
        raise ValueError(f"quant_compute must be one of {list(QUANT_COMPUTES)}, got {compute!r}")
    target_kind = QUANTIZE_TO[quantization]
    keep_pattern = re.compile("|".join(f"(?:{p})" for p in never_quantize)) if never_quantize else None

    def wants_quantized(layer_name: str, weight: torch.Tensor) -> bool:
        if target_kind is None or weight.ndim != 2 or not weight.is_floating_point():
            return False
        return keep_pattern is None or keep_pattern.search(layer_name) is None

    class QuantOps(base):
        class Linear(QuantLinear):
            pass

    QuantOps.Linear.compute = compute
    QuantOps.Linear.target_kind = target_kind
    QuantOps.Linear.wants_quantized = staticmethod(wants_quantized)
    QuantOps.Linear.shared_input = tuple(shared_input)
    QuantOps.quantization, QuantOps.compute = quantization, compute
    return QuantOps


class QuantLinear(torch.nn.Module, comfy.ops.CastWeightBiasOp):
    """``nn.Linear``'s interface over dense or packed weights (see the module docstring)."""

    comfy_cast_weights = True
    compute = "dequant"
    target_kind: str | None = None  # "fp8" / "int8" / "nvfp4": what float weights become at load
    wants_quantized: Callable[[str, torch.Tensor], bool] = staticmethod(lambda name, weight: False)
    shared_input: tuple[str, ...] = ()
    activation_group: str | None = None  # set at load from the layer's name (host/shared_activation.py)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype = dtype
        # the weight arrives at load time (often packed): no allocation of a full-size placeholder
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), device="meta", dtype=dtype),
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                       requires_grad=False) if bias else None
        self.weight_scale = None
        self.weight_scale_2 = None  # nvfp4's global scale
        self.gguf_qtype: int | None = None
        self.velox_lowrank = None

    def reset_parameters(self):
        return None

    @property
    def weight_kind(self) -> str:
        return kind_of(self.weight.dtype)

    # ------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.pop(prefix + "weight", None)
        scale = state_dict.pop(prefix + "weight_scale", None)
        if weight is None:
            missing_keys.append(prefix + "weight")
        else:
            problem = self._take_weight(weight, scale, prefix.rstrip("."))
            if problem:
                error_msgs.append(f"{prefix}weight: {problem}")
        bias = state_dict.pop(prefix + "bias", None)
        if self.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        elif self.bias is None and bias is not None:
            unexpected_keys.append(prefix + "bias")
        elif bias is not None:
            bias = bias.dequantize() if isinstance(bias, PackedWeight) else bias
            self.bias = torch.nn.Parameter(bias.to(self.weight_dtype or bias.dtype), requires_grad=False)
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):])

    def _take_weight(self, weight, scale, name: str) -> str | None:
        self.activation_group = group_of(name, self.shared_input)
        expected = (self.out_features, self.in_features)
        if isinstance(weight, PackedWeight):
            if tuple(weight.shape) != expected and not _padding_of(weight, expected):
                return f"packed shape {tuple(weight.shape)} does not fit Linear {expected}"
            self._set_storage(weight.data, weight.scale, weight.qtype, weight.scale_2)
            return None
        if tuple(weight.shape) != expected:
            return f"shape {tuple(weight.shape)} does not fit Linear {expected}"
        if weight.dtype == FP8_DTYPE:  # plain fp8 checkpoints (no scale) or scaled ones passed raw
            ones = torch.ones(())
            self._set_storage(weight, per_channel_scale(ones if scale is None else scale, self.out_features))
        elif self.wants_quantized(name, weight):
            packed = quantize_weight(weight, self.target_kind)
            self._set_storage(packed.data, packed.scale, scale_2=packed.scale_2)
        else:
            self._set_storage(weight.to(self.weight_dtype or weight.dtype))
        return None

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves packed storage and scales; a dtype conversion (``.half()``,
        ``.to(torch.bfloat16)``) must not turn fp8 codes or fp32 scales into other numbers."""
        if self.weight_kind == "dense" or self.weight.is_meta:
            return super()._apply(fn, recurse)
        target = fn(torch.empty(0, device=self.weight.device)).device
        self.weight.data = self.weight.data.to(target)
        for scale in (self.weight_scale, self.weight_scale_2):
            if scale is not None:
                scale.data = scale.data.to(target)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self

    def _set_storage(self, data: torch.Tensor, scale: torch.Tensor | None = None, qtype: int | None = None,
                     scale_2: torch.Tensor | None = None):
        self.weight = torch.nn.Parameter(data, requires_grad=False)
        if scale is not None and kind_of(data.dtype) != "nvfp4":  # nvfp4 block scales stay e4m3 bytes
            scale = scale.float()
        self.weight_scale, self.weight_scale_2 = (None if t is None else torch.nn.Parameter(t, requires_grad=False)
                                                  for t in (scale, scale_2))
        self.gguf_qtype = None if qtype is None else int(qtype)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        comfy.ops.run_every_op()
        if self.weight_kind == "dense":
            weight, bias, stream = comfy.ops.cast_bias_weight(self, input, offloadable=True)
            out = F.linear(input, weight, bias)
            comfy.ops.uncast_bias_weight(self, weight, bias, stream)
        else:
            out = self._packed_forward(input)
        side = self.velox_lowrank
        if side is not None:  # LowRankSide accumulates in place; any other callable is added
            out = side.add_to(out, input) if hasattr(side, "add_to") else out + side(input)
        return out

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = x.device, x.dtype
        data = self.weight.to(device, non_blocking=True)
        scale = None if self.weight_scale is None else self.weight_scale.to(device, non_blocking=True)
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype, non_blocking=True)
        for function in self.bias_function:
            bias = function(bias)
        shape = (self.out_features, self.in_features)
        if self.weight_kind == "nvfp4" and not self.weight_function:
            return nvfp4_linear(x, data, scale, self.weight_scale_2.to(device, non_blocking=True), shape, bias)
        if self.compute == "lowp" and self.weight_kind in ("fp8", "int8") and not self.weight_function:
            out = _lowp_linear(x, data, scale, bias, self.activation_group)
            if out is not None:
                return out
        if self._fused(x):
            fused = gguf_dequant_gemm_triton.FUSED_LINEARS[self.gguf_qtype]
            return fused(x, data, (self.out_features, self.in_features), bias)
        weight = dequantize_weight(data, shape, dtype, qtype=self.gguf_qtype, scale=scale, scale_2=self.weight_scale_2)
        for function in self.weight_function:
            weight = _apply_weight_function(function, weight)
        return F.linear(x, weight, bias)

    def _fused(self, x: torch.Tensor) -> bool:
        limit = FUSED_DEQUANT_GEMM_MAX_TOKENS.get(self.gguf_qtype, 0)
        return (limit > 0 and not self.weight_function and x.is_cuda and gguf_dequant_gemm_triton.AVAILABLE
                and x.numel() // self.in_features <= limit)

    # ------------------------------------------------------------------------------------------
    # ModelPatcher's merged LoRA patches (patch_weight_to_device): raw values in, raw values out
    # ------------------------------------------------------------------------------------------

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """ModelPatcher's float copy of the stored values -> the real weight (fp32)."""
        if self.weight_kind == "dense":
            return weight
        raw = weight.to(self.weight.dtype)  # exact: the copy holds the stored values as floats
        scale = None if self.weight_scale is None else self.weight_scale.to(raw.device)
        return dequantize_weight(raw, (self.out_features, self.in_features), torch.float32,
                                 qtype=self.gguf_qtype, scale=scale, scale_2=self.weight_scale_2)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                   return_weight: bool = False, **kwargs) -> torch.Tensor | None:
        kind = self.weight_kind
        if kind in ("fp8", "int8"):
            stored = requantize_with_scale(weight, self.weight.dtype, self.weight_scale, seed)
        elif kind in ("gguf", "nvfp4"):  # held dense until ModelPatcher restores the packed bytes
            stored = weight.to(self.weight_dtype if self.weight_dtype in MATH_DTYPES else torch.bfloat16)
        else:
            stored = weight.to(self.weight.dtype)
        if return_weight:
            return stored
        if inplace_update and stored.shape == self.weight.shape and stored.dtype == self.weight.dtype:
            self.weight.data.copy_(stored)
        else:
            self.weight = torch.nn.Parameter(stored, requires_grad=False)
        return None


def _padding_of(weight: PackedWeight, expected: tuple[int, int]) -> bool:
    """Whether an nvfp4 weight's (N16, K16) is ``expected`` zero-padded to multiples of 16 (core's
    files keep only the padded codes)."""
    return weight.kind == "nvfp4" and tuple(weight.shape) == nvfp4_torch.padded_shape(expected)


def _apply_weight_function(function, weight: torch.Tensor) -> torch.Tensor:
    """Weight functions see the real (dequantized) weight. A lowvram LoRA patch is applied directly:
    its own convert / set hooks expect stored values, which this weight no longer is."""
    if isinstance(function, comfy.model_patcher.LowVramPatch):
        return comfy.lora.calculate_weight(function.patches[function.key], weight, function.key,
                                           intermediate_dtype=weight.dtype)
    return function(weight)


def _lowp_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 group: str | None = None):
    """W8A8 with per-token activation scales, or None where this GPU has no fast W8A8 path for the kind
    (FP8 below SM 9.0, INT8 without Triton): dequantize-then-GEMM is then both faster and closer.
    On the CPU the PyTorch twins run, so the numerics are those of the GPU kernels. ``group``: the
    layer's sharing group; its siblings reuse one quantization of a shared input."""
    if data.dtype == FP8_DTYPE:
        if scaled_mm_supported(x.device, data.shape[1], data.shape[0]) and x.dtype in (torch.bfloat16, torch.float16):
            return fp8_linear_scaled_mm(x, data, scale, bias,
                                        activation=quantized_activation(x, group, fp8_row_quantizer()))
        if x.is_cuda:
            return None
        return fp8_linear_emulated(x, data, scale, bias, activation=quantized_activation(x, group, quantize_fp8_rows))
    if x.is_cuda:
        if not int8_gemm_triton.AVAILABLE:
            return None
        quantize = int8_gemm_triton.quantize_int8_rows_triton
        return int8_gemm_triton.int8_linear_triton(x, data, scale, bias,
                                                   activation=quantized_activation(x, group, quantize))
    return int8_linear_torch(x, data, scale, bias, activation=quantized_activation(x, group, quantize_int8_rows))

"""One way from canonical weights to a ComfyUI MODEL, for every family: ``build_patcher``.

A load is one pass: read (``quant_loading.read_checkpoint``) -> detect the family -> canonicalize ->
config -> build -> quantize. The family's ``model_config`` (a ``comfy.supported_models_base.BASE``) is
made by the caller from what its config step found; the rest is the same for Sana, SANA-Video, Wan
and VideoCrafter, float or quantized: devices, ComfyUI's weight / compute dtype choice, the family's
quantized ``operations`` when asked (its registry entry's keep-in-float patterns and shared
activation groups), the model, every tensor loaded and checked, and the ModelPatcher.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..errors import VeloxLoadError
from ..loaders.families import Family
from ..loaders.state_dict_fit import load_into
from .quant_loading import Weights
from .quant_ops import QuantLinear, make_quant_operations
from .quant_tensor import PackedWeight


def model_devices() -> tuple[torch.device, torch.device]:
    """(load device, offload device) of a diffusion model, as ComfyUI chooses them."""
    return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()


def choose_inference_dtype(model_config, shapes: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                           load_device) -> torch.dtype:
    """ComfyUI's weight / compute dtype choice, made from the logical shapes (packed = bf16), set on
    ``model_config``; ``dtype`` (a user's choice) wins when given."""
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(
            model_params=comfy.utils.calculate_parameters(shapes), supported_dtypes=supported,
            weight_dtype=comfy.utils.weight_dtype(shapes))
    model_config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, load_device, supported))
    return dtype


def load_checked(module: torch.nn.Module, state_dict: Weights, path, what: str, expected: str | None = None,
                 refuse_unexpected: bool = True) -> None:
    """Load every tensor; refuse a model left with a missing or unfilled parameter, and tensors it has
    no place for unless ``refuse_unexpected`` is False (then they are logged, as core's loader does).

    A packed tensor meant for anything but a Linear's weight (a quantized embedding table, say) is
    dequantized once here: only ``QuantLinear`` computes from packed storage."""
    linears = {name for name, m in module.named_modules() if isinstance(m, QuantLinear)}
    state_dict = {k: v.dequantize(torch.float32) if isinstance(v, PackedWeight)
                  and not (k.endswith(".weight") and k[: -len(".weight")] in linears) else v
                  for k, v in state_dict.items()}
    missing, unexpected = load_into(module, state_dict, path, what)
    unfilled = [name for name, p in module.named_parameters() if p.is_meta]
    if unexpected and not refuse_unexpected:
        logging.warning("Velox: %s: tensors %s have no place in %s", path, unexpected[:4], what)
        unexpected = []
    if missing or unexpected or unfilled:
        raise VeloxLoadError(path, f"weights do not fit {what} (missing {(missing or unfilled)[:4]}, "
                             f"unexpected {unexpected[:4]})", expected or f"a complete {what} checkpoint")


def describe_storage(quantization: str, compute: str, weights: Weights) -> str:
    kinds = sorted({v.kind for v in weights.values() if isinstance(v, PackedWeight)})
    return f"stored {'/'.join(kinds) or 'float'}, load-time quantization {quantization}, compute {compute}"


def build_patcher(family: Family, model_config, shapes: Mapping[str, torch.Tensor], state_dict: Weights,
                  path: str | Path | None, what: str, dtype: torch.dtype | None = None,
                  quantization: str = "none", compute: str = "dequant", label: str | None = None,
                  quantized: bool = True, expected: str | None = None,
                  refuse_unexpected: bool = True) -> comfy.model_patcher.ModelPatcher:
    """A MODEL of ``family`` built by ``model_config``: the build step of every family's load.

    shapes: the canonical names with logical shapes (detection's view: what the dtype choice and the
    model constructor read); state_dict: the same names with the weights to load (``PackedWeight``
    records included); what: the model in messages; label: in the log line (default ``what``);
    expected: what a refused file should have been (default "a complete <what> checkpoint");
    refuse_unexpected: False lets tensors the model has no place for pass with a warning (``load_checked``).
    quantized: the model gets the family's quantized ``operations`` (``quantization`` / ``compute``,
    its keep-in-float patterns and shared activation groups); False keeps ``model_config``'s own
    (core's), for float weights that nobody asked to quantize.
    """
    load_device, offload_device = model_devices()
    dtype = choose_inference_dtype(model_config, shapes, dtype, load_device)
    if quantized:
        model_config.custom_operations = make_quant_operations(quantization, compute, family.keep_float,
                                                               shared_input=family.shared_input)
    model = model_config.get_model(dict(shapes), "", device=offload_device)
    load_checked(model.diffusion_model, state_dict, path, what, expected, refuse_unexpected)
    storage = f"; {describe_storage(quantization, compute, state_dict)}" if quantized else ""
    logging.info("Velox: %s loaded from %s (%s%s)", label or what, path or "state dict", dtype, storage)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)

"""Weights into the model built for them, with a tensor of the wrong shape refused by name.

torch's ``load_state_dict`` raises a bare ``RuntimeError`` on a shape clash (even with
``strict=False``) that names neither the file nor the checkpoint it came from. Every family's build
(Sana, Wan on core's WanModel, the VideoCrafter UNet, their quantized twins) loads through here, so
that clash reads ``"<file>: tensor <key> has shape [...], <model> needs [...]"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import VeloxLoadError


def load_into(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path | None,
              what: str, load: Callable[[], object] | None = None):
    """``module.load_state_dict(state_dict, strict=False)`` (or ``load()``, a loader that fills
    ``module`` from ``state_dict``, such as core's ``load_model_weights``); its result, or a
    VeloxLoadError naming the file, the first tensor that does not fit and both shapes."""
    try:
        return load() if load is not None else module.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as error:
        raise shape_mismatch_error(module, state_dict, path, what, error) from None


def shape_mismatch_error(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                         path: str | Path | None, what: str, error: Exception) -> VeloxLoadError:
    """The VeloxLoadError for weights that ``module`` refused: the clashing tensors, worst first."""
    wanted = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    clashes = [(key, wanted[key], tuple(value.shape)) for key, value in state_dict.items()
               if key in wanted and tuple(value.shape) != wanted[key]]
    # a size clash explains the failure; a mere reshape (a 1x1 conv stored 4-D) may be legitimate
    clashes.sort(key=lambda clash: math.prod(clash[1]) == math.prod(clash[2]))
    expected = f"a checkpoint whose tensors fit {what}"
    if not clashes:
        return VeloxLoadError(path, f"weights do not fit {what}: {str(error)[:300]}", expected)
    key, want, found = clashes[0]
    more = f" ({len(clashes) - 1} more tensor(s) do not fit either)" if len(clashes) > 1 else ""
    return VeloxLoadError(path, f"tensor {key} has shape {list(found)}, {what} needs {list(want)}{more}",
                          expected)

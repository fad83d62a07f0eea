"""One W8A8 activation quantization for sibling Linears that read the same input tensor.

Core's Wan self-attention calls ``self.q(x)``, ``self.k(x)`` and ``self.v(x)`` on one ``x`` (our
VideoCrafter attention does the same); with ``quant_compute=lowp`` each call quantized that
activation again (32 760 x 5120 for Wan-14B at 480p: 0.25 ms each on an H100, 20 ms of a 2.6 s
forward). Layers whose names match a family's ``SHARED_INPUT`` pattern form a group (their parent
module); a call whose input is the very tensor object the previous call of the same group
quantized, with the same quantizer, reuses that result.

Why this is safe only for listed groups: inference tensors carry no version counter, so an in-place
change of ``x`` between two calls could not be seen. The patterns list sibling layers that core's
module code calls back to back on an unchanged input. The cache holds a weak reference to ``x`` and
drops its codes when ``x`` dies, so it never keeps memory past the input's own lifetime.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..loaders.families import FAMILIES

# family -> regular expressions (re.search over layer names) of layers that share their input with
# the sibling layers of the same parent module, called one after another on one tensor (the
# registry's ``shared_input``)
SHARED_INPUT: dict[str, tuple[str, ...]] = {f.name: f.shared_input for f in FAMILIES.values() if f.shared_input}

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Entry:
    group: str
    quantize: Quantizer
    source: weakref.ref
    value: tuple[torch.Tensor, torch.Tensor]


_last: _Entry | None = None


def group_of(layer_name: str, patterns: Sequence[str]) -> str | None:
    """The sharing group (the parent module's name) of ``layer_name``, or None."""
    if patterns and re.search("|".join(f"(?:{p})" for p in patterns), layer_name):
        return layer_name.rpartition(".")[0]
    return None


def quantized_activation(x: torch.Tensor, group: str | None, quantize: Quantizer):
    """``quantize(x as rows)``, or the previous result when this group's previous call quantized this
    same tensor with this same quantizer."""
    global _last
    rows = x.reshape(-1, x.shape[-1])
    if group is None or torch.compiler.is_compiling():
        return quantize(rows)
    entry = _last
    if entry is not None and entry.group == group and entry.quantize is quantize and entry.source() is x:
        return entry.value
    value = quantize(rows)
    _last = _Entry(group, quantize, weakref.ref(x, _forget), value)
    return value


def _forget(source: weakref.ref) -> None:
    """The input died: its codes go with it."""
    global _last
    if _last is not None and _last.source is source:
        _last = None

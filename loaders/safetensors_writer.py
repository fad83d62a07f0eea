"""Writing safetensors files, streamed: the header first (offsets computed from the plan), then each
tensor's bytes as its producer makes them, so a converted 30 GB model never sits in memory.

The layout is the safetensors one: an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``, space-padded to a
multiple of 8 bytes), then the tensors' bytes back to back in plan order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .gguf_source import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class SafetensorsPlan:
    """One tensor to write: its name, dtype and shape (the bytes follow from them)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def n_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def header_bytes(plans: Iterable[SafetensorsPlan], metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding ``plans`` in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for plan in plans:
        if plan.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {plan.name}: safetensors has no dtype {plan.dtype}")
        header[plan.name] = {"dtype": DTYPE_NAMES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.n_bytes]}
        offset += plan.n_bytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str | Path, plans: list[SafetensorsPlan],
                      produce: Callable[[SafetensorsPlan], torch.Tensor],
                      metadata: Mapping[str, str] | None = None,
                      progress: Callable[[SafetensorsPlan], None] | None = None) -> Path:
    """Write ``plans`` to ``path``: ``produce(plan)`` returns each tensor when its turn comes (of the
    planned dtype and shape, else ValueError); ``progress(plan)`` is called after each. Writes
    ``path.part`` and renames it at the end (a failure removes it)."""
    path = Path(path)
    seen = set()
    for plan in plans:
        if plan.name in seen:
            raise ValueError(f"tensor {plan.name} is planned twice")
        seen.add(plan.name)
    partial = path.with_name(path.name + ".part")
    try:
        with open(partial, "wb") as out:
            out.write(header_bytes(plans, metadata))
            for plan in plans:
                out.write(tensor_bytes(produce(plan), plan))
                if progress is not None:
                    progress(plan)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path


def tensor_bytes(tensor: torch.Tensor, plan: SafetensorsPlan) -> bytes:
    """A produced tensor's bytes, after checking it is what the header promised."""
    if tensor.dtype != plan.dtype or tuple(tensor.shape) != plan.shape:
        raise ValueError(f"tensor {plan.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                         f"planned {plan.dtype} {plan.shape}")
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

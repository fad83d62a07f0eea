"""Writing GGUF files, streamed: the whole header first (offsets computed from the plan), then each
tensor's bytes as its producer makes them, so a 30 GB model never sits in memory.

The layout is the one ``gguf_reader.py`` documents (GGUF v3, little-endian). Metadata values are
Python values typed the way gguf-py's ``GGUFValueType.get_type`` types them (str, bool, int ->
INT32 or INT64 when it does not fit, float -> FLOAT32, list -> ARRAY, bytes -> UINT8 ARRAY); wrap a value in
``Typed(value_type, value)`` to choose another type (``general.alignment`` must be UINT32).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernels.gguf_types import block_layout, check_supported, type_name
from .gguf_reader import ARRAY_TYPE, DEFAULT_ALIGNMENT, GGUF_MAGIC, SCALAR_FORMATS, STRING_TYPE, UINT8_TYPE

GGUF_VERSION = 3
UINT32, INT32, FLOAT32, BOOL, UINT64, INT64 = 4, 5, 6, 7, 10, 11


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF value type (``UINT32``, ...; arrays: the item type)."""

    value_type: int
    value: object


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: ``stored_shape`` in PyTorch order (rows..., row), bytes follow from type."""

    name: str
    qtype: int
    stored_shape: tuple[int, ...]

    @property
    def n_bytes(self) -> int:
        block_size, type_size = block_layout(self.qtype)
        numel = 1
        for size in self.stored_shape:
            numel *= size
        return numel // block_size * type_size


def check_plan(plan: TensorPlan) -> None:
    """Refuse what no reader could read back: unknown types, rows that are not whole blocks, > 4 dims."""
    check_supported(plan.qtype, plan.name)
    block_size, _ = block_layout(plan.qtype)
    if not 1 <= len(plan.stored_shape) <= 4 or plan.stored_shape[-1] % block_size:
        raise ValueError(f"tensor {plan.name}: shape {plan.stored_shape} cannot be stored as "
                         f"{type_name(plan.qtype)} (1-4 dims, rows a multiple of {block_size})")


# ----------------------------------------------------------------------------------------------
# header encoding
# ----------------------------------------------------------------------------------------------


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _infer_type(value: object) -> int:
    if isinstance(value, Typed):
        return value.value_type
    if isinstance(value, (bytes, bytearray)):
        return ARRAY_TYPE
    if isinstance(value, str):
        return STRING_TYPE
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, (int, np.integer)):
        return INT32 if -(1 << 31) <= int(value) < 1 << 31 else INT64
    if isinstance(value, (float, np.floating)):
        return FLOAT32
    if isinstance(value, (list, tuple)):
        return ARRAY_TYPE
    raise TypeError(f"cannot store {type(value).__name__} as GGUF metadata")


def encode_value(value: object, value_type: int | None = None) -> bytes:
    """The bytes of one metadata value (without its type tag)."""
    raw = value.value if isinstance(value, Typed) else value
    value_type = _infer_type(value) if value_type is None else value_type
    if isinstance(value, Typed) and isinstance(raw, (list, tuple)):
        return _encode_array(list(raw), value.value_type)
    if value_type in SCALAR_FORMATS:
        return struct.pack(SCALAR_FORMATS[value_type], raw)
    if value_type == STRING_TYPE:
        return _string(raw)
    if value_type == ARRAY_TYPE and isinstance(raw, (bytes, bytearray)):
        return struct.pack("<IQ", UINT8_TYPE, len(raw)) + bytes(raw)
    if value_type == ARRAY_TYPE:
        return _encode_array(list(raw), None)
    raise TypeError(f"unknown GGUF value type {value_type}")


def _encode_array(items: list, item_type: int | None) -> bytes:
    if item_type is None:
        types = {_infer_type(item) for item in items} or {INT32}
        item_type = INT64 if types == {INT32, INT64} else types.pop() if len(types) == 1 else None
        if item_type is None:
            raise TypeError(f"a GGUF array holds one type, got {sorted(types)}")
    if item_type in SCALAR_FORMATS:
        body = np.asarray(items, dtype=np.dtype(SCALAR_FORMATS[item_type])).tobytes()
    else:
        body = b"".join(encode_value(item, item_type) for item in items)
    return struct.pack("<IQ", item_type, len(items)) + body


def _encode_kv(key: str, value: object) -> bytes:
    value_type = ARRAY_TYPE if isinstance(value, Typed) and isinstance(value.value, (list, tuple)) \
        else _infer_type(value)
    return _string(key) + struct.pack("<I", value_type) + encode_value(value)


def align(offset: int, alignment: int = DEFAULT_ALIGNMENT) -> int:
    return -(-offset // alignment) * alignment


def encode_header(metadata: Mapping[str, object], plans: Iterable[TensorPlan],
                  alignment: int = DEFAULT_ALIGNMENT) -> tuple[bytes, list[int]]:
    """(header bytes padded to ``alignment``, each tensor's offset from the data start)."""
    plans = list(plans)
    kv = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        kv["general.alignment"] = Typed(UINT32, alignment)
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(plans), len(kv))]
    parts += [_encode_kv(key, value) for key, value in kv.items()]
    offsets, offset = [], 0
    for plan in plans:
        dims = tuple(reversed(plan.stored_shape))
        parts.append(_string(plan.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, plan.qtype, offset))
        offsets.append(offset)
        offset = align(offset + plan.n_bytes, alignment)
    header = b"".join(parts)
    return header + b"\0" * (align(len(header), alignment) - len(header)), offsets


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------

TensorBytes = Callable[[TensorPlan], "np.ndarray | tuple[np.ndarray, int]"]


def write_gguf(path: str | Path, metadata: Mapping[str, object], plans: Iterable[TensorPlan],
               produce: TensorBytes, alignment: int = DEFAULT_ALIGNMENT,
               progress: Callable[[TensorPlan], None] | None = None) -> list[TensorPlan]:
    """Write ``path``: header from ``plans``, then ``produce(plan)`` for each plan in order, one at a time.

    ``produce`` returns the tensor's bytes (uint8, ``plan.n_bytes`` of them), or ``(bytes, qtype)``
    to store another type of the same size (F16 -> BF16 when a value overflows fp16); the header,
    whose length does not depend on types, is then rewritten in place at the end. ``progress`` is
    called after each tensor. Writes ``path.part`` and renames it at the end (a failure removes it),
    so a failed conversion leaves no file that looks complete. Returns the plans as written.
    """
    path = Path(path)
    plans = list(plans)
    for plan in plans:
        check_plan(plan)
    header, _ = encode_header(metadata, plans, alignment)
    written: list[TensorPlan] = []
    partial = path.with_name(path.name + ".part")
    try:
        with open(partial, "wb") as out:
            out.write(header)
            for plan in plans:
                data, plan = _produced(produce, plan)
                out.write(memoryview(data))
                out.write(b"\0" * (align(plan.n_bytes, alignment) - plan.n_bytes))
                written.append(plan)
                if progress is not None:
                    progress(plan)
            if written != plans:
                out.seek(0)
                out.write(encode_header(metadata, written, alignment)[0])
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return written


def _produced(produce: TensorBytes, plan: TensorPlan) -> tuple[np.ndarray, TensorPlan]:
    result = produce(plan)
    data, qtype = result if isinstance(result, tuple) else (result, plan.qtype)
    final = plan if int(qtype) == int(plan.qtype) else TensorPlan(plan.name, int(qtype), plan.stored_shape)
    data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if data.size != plan.n_bytes or final.n_bytes != plan.n_bytes:
        raise ValueError(f"tensor {plan.name}: produced {data.size} bytes of {type_name(final.qtype)}, "
                         f"{type_name(plan.qtype)} {plan.stored_shape} needs {plan.n_bytes}")
    return data, final

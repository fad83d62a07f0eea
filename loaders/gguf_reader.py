"""GGUF files -> tensor records over a memory map: our own small parser of the GGUF v2/v3 layout.

Nothing is copied: every tensor's ``data`` is a ``uint8`` view of the mapped file, so reading a
30 GB checkpoint costs only the header in RAM. Everything the header claims is checked against
the file before a view is made (sizes, offsets, types, names), and any failure is a
``VeloxLoadError`` naming the file: a truncated download, a file that is not GGUF, a type Velox
cannot dequantize (named: ``"IQ2_XXS"``) or a tensor whose shape does not fit its type.

Layout (little-endian; ggml ``gguf.cpp``, gguf-py ``gguf_reader.py``)::

    "GGUF" · u32 version · u64 n_tensors · u64 n_kv
    n_kv × (string key · u32 value_type · value)          string = u64 length · utf-8 bytes
    n_tensors × (string name · u32 n_dims · n_dims × u64 ne (innermost first) · u32 type · u64 offset)
    padding to ``general.alignment`` (default 32) · tensor data (offsets relative to here)
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VeloxLoadError
from ..kernels.gguf_types import block_layout, check_supported, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml itself stops at 4 (GGML_MAX_DIMS), but gguf-py writes more, and city96's Wan files hold the
# 5-D patch_embedding.weight (F32) so; a larger count is a corrupt header.
MAX_DIMS = 8
MAX_NESTING = 4  # arrays of arrays: real files use at most one level
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."  # city96's key for shapes the writer reshaped

# GGUF metadata value types: number -> struct format (scalars); 8 string, 9 array.
SCALAR_FORMATS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
STRING_TYPE, ARRAY_TYPE, UINT8_TYPE = 8, 9, 0
# The smallest a header record can be, to refuse absurd counts before looping over them.
MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims 0, type, offset


@dataclass(frozen=True)
class GGUFTensorRecord:
    """One tensor of a GGUF file, not yet dequantized.

    ``shape``: logical shape in PyTorch order (the file's ggml dims reversed, or the original shape
    recorded in ``comfy.gguf.orig_shape.<name>`` when the writer reshaped the tensor).
    ``data``: ``(rows, bytes_per_row)`` uint8 view of the raw bytes in the memory map (read-only),
    rows = product of the *stored* shape but its last dim.
    """

    name: str
    qtype: int
    type_name: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def n_bytes(self) -> int:
        return int(self.data.size)


@dataclass(frozen=True)
class GGUFContents:
    """A parsed GGUF file: ``metadata`` key -> value (int, float, bool, str, a list of those, or
    ``bytes`` for a UINT8 array),
    ``tensors`` in file order, ``architecture`` = ``general.architecture`` when it is a string."""

    path: Path
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensorRecord]
    architecture: str | None


def read_gguf(path: str | Path) -> GGUFContents:
    """Memory-map ``path`` and parse it; raise VeloxLoadError on anything malformed or unsupported."""
    path = Path(path)
    if not path.is_file():
        raise VeloxLoadError(path, "file not found", "an existing .gguf file")
    if path.stat().st_size == 0:
        raise _truncated(path, "the file is empty")
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as error:
        raise VeloxLoadError(path, f"cannot memory-map the file ({error})", "a readable .gguf file") from None
    return parse_gguf(mapped, path)


def parse_gguf(buffer: np.ndarray | bytes, path: str | Path | None = None) -> GGUFContents:
    """Parse GGUF bytes already in memory or mapped (``read_gguf`` maps a file and calls this).

    ``buffer``: the whole file as a 1-D uint8 array (memmap) or bytes; tensor views point into it.
    """
    array = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
    cursor = _Cursor(array, path)
    n_tensors, n_kv = _read_preamble(cursor)
    metadata = _read_metadata(cursor, n_kv)
    infos = _read_tensor_infos(cursor, n_tensors)
    alignment = _alignment(metadata, path)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {info[0]: _make_record(array, info, data_start, alignment, metadata, path) for info in infos}
    architecture = metadata.get("general.architecture")
    return GGUFContents(
        path=Path(path) if path is not None else Path("<memory>"),
        metadata=metadata,
        tensors=tensors,
        architecture=architecture if isinstance(architecture, str) else None,
    )


def record_as_torch(record: GGUFTensorRecord):
    """The record's bytes as a zero-copy ``torch.uint8`` tensor of the same shape.

    The map is read-only; torch warns that it cannot mark the tensor read-only, which is fine
    because Velox never writes into weights in place.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(record.data)


# ----------------------------------------------------------------------------------------------
# low-level reading
# ----------------------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian values at ``pos`` of a uint8 array, bounds-checked."""

    def __init__(self, array: np.ndarray, path: str | Path | None):
        self.array = array
        self.size = int(array.size)
        self.path = path
        self.pos = 0

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int) -> int:
        """Advance by ``n`` bytes; return the start. Raises on reading past the end."""
        if n < 0 or n > self.remaining():
            raise _truncated(self.path, f"the header needs {n} bytes at offset {self.pos}, "
                             f"the file has {self.size}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.array, start)[0]

    def u32(self) -> int:
        return self.scalar("<I")

    def u64(self) -> int:
        return self.scalar("<Q")

    def string(self, what: str) -> str:
        length = self.u64()
        if length > self.remaining():
            raise _truncated(self.path, f"{what} claims {length} bytes, only {self.remaining()} remain")
        start = self.take(length)
        return self.array[start:start + length].tobytes().decode("utf-8", errors="replace")


def _truncated(path: str | Path | None, detail: str) -> VeloxLoadError:
    return VeloxLoadError(path, f"truncated or corrupt GGUF file ({detail})",
                          "a complete .gguf file (download it again)")


def _read_preamble(cursor: _Cursor) -> tuple[int, int]:
    path = cursor.path
    if cursor.size < 4 or cursor.array[:4].tobytes() != GGUF_MAGIC:
        head = cursor.array[:4].tobytes()
        raise VeloxLoadError(path, f"not a GGUF file (starts with {head!r}, not b'GGUF')", "a .gguf file")
    cursor.take(4)
    version = cursor.u32()
    if version not in SUPPORTED_VERSIONS:
        detail = " (a big-endian file)" if version & 0xFFFF == 0 and version else ""
        raise VeloxLoadError(path, f"GGUF version {version}{detail} is not supported",
                             "a little-endian GGUF file of version 2 or 3")
    n_tensors, n_kv = cursor.u64(), cursor.u64()
    if n_kv * MIN_KV_BYTES > cursor.remaining():
        raise _truncated(path, f"{n_kv} metadata entries cannot fit in {cursor.size} bytes")
    if n_tensors * MIN_TENSOR_INFO_BYTES > cursor.remaining():
        raise _truncated(path, f"{n_tensors} tensors cannot fit in {cursor.size} bytes")
    return n_tensors, n_kv


def _read_metadata(cursor: _Cursor, n_kv: int) -> dict[str, object]:
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cursor.string("a metadata key")
        if key in metadata:
            raise VeloxLoadError(cursor.path, f"metadata key {key!r} appears twice", "unique metadata keys")
        metadata[key] = _read_value(cursor, cursor.u32(), key, depth=0)
    return metadata


def _read_value(cursor: _Cursor, value_type: int, key: str, depth: int) -> object:
    if value_type in SCALAR_FORMATS:
        return cursor.scalar(SCALAR_FORMATS[value_type])
    if value_type == STRING_TYPE:
        return cursor.string(f"metadata {key!r}")
    if value_type == ARRAY_TYPE and depth < MAX_NESTING:
        return _read_array(cursor, key, depth)
    raise VeloxLoadError(cursor.path, f"metadata {key!r} has unknown value type {value_type}",
                         "GGUF value types 0-12 (arrays nested at most 4 deep)")


def _read_array(cursor: _Cursor, key: str, depth: int) -> list | bytes:
    item_type, count = cursor.u32(), cursor.u64()
    if item_type in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[item_type]
        item_size = struct.calcsize(fmt)
        if count > cursor.remaining() // item_size:
            raise _truncated(cursor.path, f"array {key!r} claims {count} items, the file is too short")
        start = cursor.take(count * item_size)
        if item_type == UINT8_TYPE:  # byte blobs (a tokenizer model): bytes, not a list of ints
            return cursor.array[start:start + count].tobytes()
        return np.frombuffer(cursor.array, dtype=np.dtype(fmt), count=count, offset=start).tolist()
    # Strings and nested arrays take at least 8 bytes (their length) per item.
    if count > cursor.remaining() // 8:
        raise _truncated(cursor.path, f"array {key!r} claims {count} items, the file is too short")
    return [_read_value(cursor, item_type, key, depth + 1) for _ in range(count)]


def _read_tensor_infos(cursor: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, ggml dims innermost first, type, offset) per tensor, names unique."""
    infos, seen = [], set()
    for _ in range(n_tensors):
        name = cursor.string("a tensor name")
        if name in seen:
            raise VeloxLoadError(cursor.path, f"tensor {name!r} appears twice", "unique tensor names")
        seen.add(name)
        n_dims = cursor.u32()
        if n_dims > MAX_DIMS:
            raise VeloxLoadError(cursor.path, f"tensor {name!r} has {n_dims} dimensions",
                                 f"at most {MAX_DIMS}")
        dims = tuple(cursor.u64() for _ in range(n_dims))
        qtype, offset = cursor.u32(), cursor.u64()
        infos.append((name, dims, qtype, offset))
    return infos


def _alignment(metadata: dict[str, object], path: str | Path | None) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 30:
        raise VeloxLoadError(path, f"general.alignment is {alignment!r}", "a power of two (default 32)")
    return alignment


# ----------------------------------------------------------------------------------------------
# tensor records
# ----------------------------------------------------------------------------------------------


def _make_record(array: np.ndarray, info: tuple[str, tuple[int, ...], int, int], data_start: int,
                 alignment: int, metadata: dict[str, object], path: str | Path | None) -> GGUFTensorRecord:
    name, dims, qtype, offset = info
    check_supported(qtype, name, None if path is None else str(path))
    stored_shape = tuple(reversed(dims)) or (1,)
    row_bytes, rows = _row_layout(name, stored_shape, qtype, path)
    n_bytes = row_bytes * rows
    start = data_start + offset
    if offset % alignment:
        raise VeloxLoadError(path, f"tensor {name!r} starts at offset {offset}, not a multiple of "
                             f"the alignment {alignment}", "aligned tensor offsets")
    if start + n_bytes > array.size:
        raise _truncated(path, f"tensor {name!r} ({n_bytes} bytes at {start}) ends past the end of the "
                         f"file ({array.size} bytes)")
    data = array[start:start + n_bytes].reshape(rows, row_bytes)
    shape = _logical_shape(name, dims, metadata, path)
    return GGUFTensorRecord(name=name, qtype=qtype, type_name=type_name(qtype), shape=shape, data=data)


MAX_DIMENSION = 1 << 40  # far above any real weight's dimension, far below what numpy refuses


def _row_layout(name: str, shape: tuple[int, ...], qtype: int, path: str | Path | None) -> tuple[int, int]:
    """(bytes per row, rows) of a stored shape; a row must be whole blocks and the size sane."""
    block_size, type_size = block_layout(qtype)
    row = shape[-1]
    if row % block_size:
        raise VeloxLoadError(path, f"tensor {name!r} of type {type_name(qtype)} has rows of {row} elements, "
                             f"not a multiple of its block size {block_size}",
                             "rows that are whole blocks (a shape/type mismatch: corrupt or mislabelled)")
    rows = 1
    for size in shape[:-1]:
        rows *= size
    row_bytes = row // block_size * type_size
    # every dimension, not only the product: (huge, 0) has no bytes but no array can take its shape either
    if max(shape) > MAX_DIMENSION or rows * row_bytes > 1 << 62:
        raise VeloxLoadError(path, f"tensor {name!r} claims shape {shape}", "a tensor that fits in a file")
    return row_bytes, rows


def _logical_shape(name: str, dims: tuple[int, ...], metadata: dict[str, object],
                   path: str | Path | None) -> tuple[int, ...]:
    """PyTorch-order shape: ggml dims reversed, or city96's recorded original shape."""
    stored = tuple(reversed(dims))
    original = metadata.get(ORIG_SHAPE_PREFIX + name)
    if original is None:
        return stored
    numel = int(np.prod(stored, dtype=object)) if stored else 1
    if (not isinstance(original, list) or not all(type(d) is int and d >= 0 for d in original)
            or int(np.prod(original, dtype=object) if original else 1) != numel):
        raise VeloxLoadError(path, f"{ORIG_SHAPE_PREFIX}{name} is {original!r}, which does not fit the "
                             f"stored shape {stored}", "an integer list with the same number of elements")
    return tuple(original)

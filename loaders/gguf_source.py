"""Checkpoints opened lazily for conversion: names, shapes and dtypes first, each tensor read on demand.

The GGUF converter plans the whole file from shapes, then reads one tensor (or one block's
tensors) at a time, so its memory stays near one layer whatever the model's size. Sources:
a ``.safetensors`` file (``safe_open``: nothing read until asked), a sharded
``*.safetensors.index.json``, a diffusers folder (its ``component``) and weights-only pickles
(``torch.load(mmap=True)``: tensors stay in the file until touched; an old non-zip pickle is
read whole, which the report notes).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from .checkpoint_files import (
    PICKLE_SUFFIXES,
    load_weights_only_pickle,
    pickle_error,
    read_safetensors_header,
    read_weight_map,
    resolve_diffusers_component,
    unwrap_state_dict,
)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class LazyCheckpoint:
    """A checkpoint's tensors by name: ``meta[name]`` is a meta tensor (shape, dtype), ``load(name)``
    reads the real one. ``config``: the diffusers config.json, ``metadata``: safetensors metadata."""

    path: Path
    meta: dict[str, torch.Tensor]
    loaders: dict[str, Callable[[], torch.Tensor]]
    config: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def load(self, name: str) -> torch.Tensor:
        return self.loaders[name]()


def open_checkpoint(path: str | Path, component: str = "transformer") -> LazyCheckpoint:
    """A file or diffusers folder, opened lazily (see the module docstring for the forms read)."""
    path = Path(path)
    if path.is_dir():
        files = resolve_diffusers_component(path, component)
        checkpoint = _open_files(path, files.weight_files)
        checkpoint.config = files.config() or None
        return checkpoint
    if not path.is_file():
        raise VeloxLoadError(path, "file not found", "an existing checkpoint file or diffusers folder")
    return _open_files(path, [path])


def _open_files(path: Path, files: list[Path]) -> LazyCheckpoint:
    checkpoint = LazyCheckpoint(path, {}, {})
    for file in files:
        name = file.name.lower()
        if name.endswith(".index.json"):
            shards = sorted(set(read_weight_map(file).values()))
            for shard in shards:
                _add_safetensors(checkpoint, file.parent / shard)
        elif name.endswith(".safetensors"):
            _add_safetensors(checkpoint, file)
        elif name.endswith(PICKLE_SUFFIXES):
            _add_pickle(checkpoint, file)
        else:
            raise VeloxLoadError(file, f"unknown checkpoint type '{file.suffix}'",
                                 ".safetensors, *.safetensors.index.json, .pth, .pt, .ckpt or .bin")
    if not checkpoint.meta:
        raise VeloxLoadError(path, "holds no tensors", "a checkpoint with weights")
    return checkpoint


def _add_safetensors(checkpoint: LazyCheckpoint, file: Path) -> None:
    from safetensors import safe_open

    if not file.is_file():
        raise VeloxLoadError(checkpoint.path, f"shard {file.name} listed in the index is missing",
                             f"every shard next to the index in {file.parent}")
    header = read_safetensors_header(file)
    checkpoint.metadata.update(header.get("__metadata__") or {})
    handle = safe_open(str(file), framework="pt", device="cpu")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise VeloxLoadError(file, f"tensor {name} has dtype {info['dtype']}", "float or integer tensors")
        checkpoint.meta[name] = torch.empty(info["shape"], dtype=dtype, device="meta")
        checkpoint.loaders[name] = (lambda key=name: handle.get_tensor(key))


def _add_pickle(checkpoint: LazyCheckpoint, file: Path) -> None:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error).lower():
            raise VeloxLoadError(file, f"truncated or corrupt checkpoint ({str(error)[:200]})",
                                 "a complete torch checkpoint") from None
        checkpoint.notes.append(f"{file.name} is an old (non-zip) pickle: read whole into memory")
        obj = load_weights_only_pickle(file)
    except pickle.UnpicklingError as error:
        raise pickle_error(file, str(error)) from None
    except (EOFError, OSError) as error:
        raise VeloxLoadError(file, f"truncated or corrupt checkpoint ({str(error)[:200]})",
                             "a complete torch checkpoint") from None
    for name, tensor in unwrap_state_dict(obj, file).items():
        checkpoint.meta[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        checkpoint.loaders[name] = (lambda value=tensor: value)

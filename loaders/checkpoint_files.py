"""Checkpoint files -> state dicts, safely: safetensors (header checked first), weights-only
pickles, sharded ``*.safetensors.index.json``, diffusers folders and the local Hugging Face cache
(offline: nothing here downloads)."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import VeloxLoadError

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
WRAPPER_KEYS = ("state_dict", "model", "module")
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
# every loader refuses a checkpoint that only a code-running unpickler can load with these words
PICKLE_ONLY_REFUSED = "pickle-only checkpoint, refused; convert to safetensors"
# Weight files of one diffusers component, most preferred first.
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
HF_CACHE_ENV = (("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""), ("HF_HOME", "hub"))


# ----------------------------------------------------------------------------------------------
# one entry point
# ----------------------------------------------------------------------------------------------


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a file (.safetensors, .pth/.pt/.ckpt/.bin, *.index.json) or a
    diffusers folder (its ``transformer/`` component). All on the CPU."""
    path = Path(path)
    if path.is_dir():
        component = resolve_diffusers_component(path, "transformer")
        return _load_files(component.weight_files)
    if not path.is_file():
        raise VeloxLoadError(path, "file not found", "an existing checkpoint file or diffusers folder")
    return _load_files([path])


def _load_files(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(_loader_for(file)(file))
    return state_dict


def _loader_for(path: Path) -> Callable[[Path], dict[str, torch.Tensor]]:
    name = path.name.lower()
    if name.endswith(".index.json"):
        return load_sharded_safetensors
    if name.endswith(".safetensors"):
        return load_safetensors
    if name.endswith(PICKLE_SUFFIXES):
        return load_weights_only_pickle
    raise VeloxLoadError(path, f"unknown checkpoint type '{path.suffix}'",
                         ".safetensors, *.safetensors.index.json, .pth, .pt, .ckpt or .bin")


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> dict:
    """Parse and check a safetensors header against the file size; raise VeloxLoadError on a
    truncated or corrupt file instead of letting the reader fail later."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"only {size} bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"header claims {header_len} bytes, file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _corrupt(path, f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    _check_tensor_extents(path, header, size - 8 - header_len)
    return header


def _check_tensor_extents(path: Path, header: dict, data_bytes: int) -> None:
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            expected = numel * SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
        except (TypeError, KeyError, ValueError):
            raise _corrupt(path, f"tensor {name} has a malformed header entry") from None
        if end > data_bytes:
            raise _corrupt(path, f"tensor {name} ends at byte {end} of {data_bytes} bytes of data")
        if info["dtype"] in SAFETENSORS_DTYPE_BYTES and end - start != expected:
            raise _corrupt(path, f"tensor {name} spans {end - start} bytes, its shape needs {expected}")


def _corrupt(path: Path, detail: str) -> VeloxLoadError:
    return VeloxLoadError(path, f"truncated or corrupt safetensors ({detail})",
                          "a complete .safetensors file (download it again)")


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header checked first); {} when it has none."""
    return read_safetensors_header(path).get("__metadata__") or {}


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, header validated first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    read_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise _corrupt(path, str(error)) from None


def load_sharded_safetensors(index_path: str | Path) -> dict[str, torch.Tensor]:
    """A ``*.safetensors.index.json`` and the shards its ``weight_map`` names (next to it)."""
    index_path = Path(index_path)
    weight_map = read_weight_map(index_path)
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise VeloxLoadError(index_path, f"shard {shard.name} listed in the index is missing",
                                 f"every shard next to the index in {index_path.parent}")
    state_dict = _load_files(shards)
    absent = [k for k in weight_map if k not in state_dict]
    if absent:
        raise VeloxLoadError(index_path,
                             f"{len(absent)} tensor(s) of the index are in no shard: {absent[:4]}",
                             "shards that hold every tensor the index lists")
    return state_dict


def read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VeloxLoadError(index_path, f"corrupt shard index: not JSON ({error})",
                             'a JSON object with a "weight_map" of tensor name -> shard file') from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise VeloxLoadError(index_path, 'corrupt shard index: no "weight_map" of tensor name -> shard file',
                             'a JSON object with a "weight_map"')
    return weight_map


# ----------------------------------------------------------------------------------------------
# pickles, weights only
# ----------------------------------------------------------------------------------------------


def load_weights_only_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """A .pth/.pt/.ckpt/.bin through ``torch.load(weights_only=True)``, wrappers removed."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle_error(path, str(error)) from None
    except (EOFError, RuntimeError, OSError) as error:
        raise VeloxLoadError(path, f"truncated or corrupt checkpoint ({str(error)[:200]})",
                             "a complete torch checkpoint") from None
    return unwrap_state_dict(obj, path)


def pickle_error(path: Path, message: str) -> VeloxLoadError:
    """Tell "stores Python objects" (needs unsafe pickle) apart from "not a checkpoint at all"; the
    first in the pack's own words, never PyTorch's multi-line ``weights_only`` advice."""
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if unsafe:
        return VeloxLoadError(path, f"{PICKLE_ONLY_REFUSED} (it stores the Python object {unsafe.group(1)})")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    return VeloxLoadError(
        path, f"truncated or corrupt checkpoint, or one that needs unsafe pickle "
        f"({detail.group(1).strip() if detail else 'unreadable pickle'})",
        "a complete weights-only torch checkpoint or a .safetensors file",
    )


def unwrap_state_dict(obj: object, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Peel ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"module": ...}`` wrappers and keep
    the tensors (an official Sana .pth is ``{"state_dict": {...}}``)."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or any(torch.is_tensor(v) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise VeloxLoadError(path, f"holds a {type(obj).__name__}, not a state dict",
                             "a mapping of names to tensors")
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise VeloxLoadError(path, "holds no tensors", "a mapping of names to tensors")
    return tensors


DIFFUSION_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI's, every family's


def strip_diffusion_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix, unprefixed
    (a ComfyUI checkpoint may bundle a VAE and text encoder beside them); else all, unchanged."""
    for prefix in DIFFUSION_MODEL_PREFIXES:
        selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if selected:
            return selected
    return dict(state_dict)


def diffusion_model_weights(obj: object, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's diffusion-model tensors: wrappers peeled (``unwrap_state_dict``), ComfyUI's prefix
    stripped (``strip_diffusion_model_prefix``). The format's part of every family's load."""
    return strip_diffusion_model_prefix(unwrap_state_dict(obj, path))


# ----------------------------------------------------------------------------------------------
# diffusers folders
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentFiles:
    """One diffusers component: its folder, its config.json (if any) and its weight files."""

    directory: Path
    config_path: Path | None
    weight_files: list[Path]

    def config(self) -> dict:
        """config.json as a dict ({} when absent)."""
        return {} if self.config_path is None else _read_config(self.config_path)


def _read_config(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VeloxLoadError(config_path, f"corrupt config.json ({error})", "a JSON object") from None
    if not isinstance(config, dict):
        raise VeloxLoadError(config_path, "config.json is not a JSON object", "a JSON object")
    return config


def sibling_config(path: str | Path) -> dict | None:
    """The config.json of the component folder a weights file sits in, when there is one.

    A file picked on its own from ``<pipeline>/transformer/`` (or an official folder) has lost the
    facts only its config states (Sana's position embedding, Wan's head count); every family reads
    them from here, as it would for the folder. Only a model config counts (diffusers writes
    ``_class_name``): a stray config.json of something else in a models folder is ignored."""
    config_path = Path(path).parent / "config.json"
    if not config_path.is_file():
        return None
    config = _read_config(config_path)
    return config if "_class_name" in config else None


def resolve_diffusers_component(folder: str | Path, component: str = "transformer") -> ComponentFiles:
    """``folder/<component>/`` of a diffusers pipeline, or ``folder`` itself when it holds a model."""
    folder = Path(folder)
    for directory in (folder / component, folder):
        weights = _component_weights(directory)
        if weights:
            config = directory / "config.json"
            return ComponentFiles(directory, config if config.is_file() else None, weights)
    raise VeloxLoadError(
        folder, f"no {component} weights in this folder or its '{component}/' subfolder",
        f"a diffusers folder with {component}/config.json and "
        f"{component}/diffusion_pytorch_model.safetensors",
    )


def read_component(path: str | Path, component: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors of a file, or of a diffusers folder's ``component``, with the config.json that
    describes them (the folder's, or the one next to the file; None when there is none)."""
    path = Path(path)
    if not path.is_dir():
        return load_state_dict(path), sibling_config(path)
    files = resolve_diffusers_component(path, component)
    state_dict: dict[str, torch.Tensor] = {}
    for weight_file in files.weight_files:
        state_dict.update(load_state_dict(weight_file))
    return state_dict, files.config() or None


def _component_weights(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (directory / name).is_file():
            return [directory / name]
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    singles = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    return indexes[:1] or singles[:1]


# ----------------------------------------------------------------------------------------------
# the local Hugging Face cache (read only, offline)
# ----------------------------------------------------------------------------------------------


def hf_hub_cache_dir() -> Path:
    """Where huggingface_hub keeps repositories: HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub."""
    for variable, child in HF_CACHE_ENV:
        value = os.environ.get(variable)
        if value:
            return Path(value).expanduser() / child
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def list_hf_cache_repos(
    predicate: Callable[[str, Path], bool] | None = None, cache_dir: str | Path | None = None
) -> list[str]:
    """Model repositories in the local cache with a snapshot, as ``Org/Name``; ``predicate(repo_id,
    snapshot_dir)`` filters them (e.g. "has a Sana transformer")."""
    root = Path(cache_dir) if cache_dir is not None else hf_hub_cache_dir()
    if not root.is_dir():
        return []
    repos = []
    for entry in sorted(root.glob("models--*")):
        repo_id = entry.name[len("models--"):].replace("--", "/", 1)
        snapshot = _snapshot_dir(entry, "main")
        if snapshot is not None and (predicate is None or predicate(repo_id, snapshot)):
            repos.append(repo_id)
    return repos


def resolve_hf_cache_repo(repo_id: str, revision: str = "main", cache_dir: str | Path | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (a ref name or commit) in the local cache."""
    root = Path(cache_dir) if cache_dir is not None else hf_hub_cache_dir()
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = _snapshot_dir(repo_dir, revision)
    if snapshot is None:
        raise VeloxLoadError(
            repo_id, f"is not in the local Hugging Face cache (looked in {repo_dir})",
            f"the repository downloaded beforehand, e.g. `huggingface-cli download {repo_id}`",
        )
    return snapshot


def _snapshot_dir(repo_dir: Path, revision: str) -> Path | None:
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    if (snapshots / commit).is_dir():
        return snapshots / commit
    if ref.is_file() or revision != "main":
        return None
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None

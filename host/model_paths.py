"""Model choices for loader dropdowns, resolved through ComfyUI's ``folder_paths``.

A choice is one of:
- a file under one of the folder key's paths (``folder_paths.get_filename_list``);
- a folder there holding a diffusers / Hugging Face model (listed with a trailing ``/``);
- a repository already in the local Hugging Face cache, offline: ``hf-cache: Org/Name``.
"""

from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath
from typing import Callable

import folder_paths

from ..errors import VeloxLoadError
from ..loaders.checkpoint_files import list_hf_cache_repos, resolve_hf_cache_repo

HF_CACHE_PREFIX = "hf-cache: "


def _model_folders(folder_key: str, is_model_folder: Callable[[Path], bool]) -> list[str]:
    found = []
    for base in folder_paths.get_folder_paths(folder_key):
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            if entry.is_dir() and is_model_folder(Path(entry.path)):
                found.append(entry.name + "/")
    return found


def _files_with_extensions(folder_key: str, extensions: tuple[str, ...]) -> list[str]:
    """Files ComfyUI's own list leaves out (its extension set for the key lacks ``.gguf``)."""
    found: set[str] = set()
    for base in folder_paths.get_folder_paths(folder_key):
        if os.path.isdir(base):
            files, _ = folder_paths.recursive_search(base, excluded_dir_names=[".git"])
            found.update(folder_paths.filter_files_extensions(files, extensions))
    return sorted(found)


def model_choices(folder_key: str, is_model_folder: Callable[[Path], bool],
                  extra_extensions: tuple[str, ...] = ()) -> list[str]:
    """Files, model folders and HF-cache repositories for a loader's dropdown; ``extra_extensions``
    (``(".gguf",)``) adds files of those types."""
    files = list(folder_paths.get_filename_list(folder_key))
    if extra_extensions:
        files = sorted(set(files) | set(_files_with_extensions(folder_key, extra_extensions)))
    folders = _model_folders(folder_key, is_model_folder)
    cached = [HF_CACHE_PREFIX + repo for repo in list_hf_cache_repos(lambda _repo, snapshot: is_model_folder(snapshot))]
    return files + folders + cached


def _leaves_model_folder(choice: str) -> bool:
    """A dropdown value is relative to a model folder: an absolute path or a '..' would name a place
    outside it (core maps such file names back inside; a folder name it never sees)."""
    path = PureWindowsPath(choice)  # splits at both separators; "/x", "C:x" and UNC shares have an anchor
    return bool(path.anchor) or ".." in path.parts


def resolve_model_choice(folder_key: str, choice: str) -> Path:
    """The file or folder a dropdown value names; a clear error when it is gone."""
    if _leaves_model_folder(choice):
        raise VeloxLoadError(choice, f"the name {choice!r} leaves models/{folder_key}", "a name the loader lists")
    if choice.startswith(HF_CACHE_PREFIX):
        return resolve_hf_cache_repo(choice[len(HF_CACHE_PREFIX):])
    if choice.endswith("/"):
        for base in folder_paths.get_folder_paths(folder_key):
            candidate = Path(base) / choice.rstrip("/")
            if candidate.is_dir():
                return candidate
        raise VeloxLoadError(choice, f"no such folder under models/{folder_key}")
    path = folder_paths.get_full_path(folder_key, choice)
    if path is None:
        raise VeloxLoadError(choice, f"not found in models/{folder_key}", "a file listed by the loader")
    return Path(path)

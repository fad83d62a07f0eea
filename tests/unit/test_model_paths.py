"""Loader dropdowns: files, model folders and offline Hugging Face cache repositories."""

from __future__ import annotations

import pytest

from velox.models.sana import SanaConfig
from velox.tiny.sana import (
    tiny_sana_state_dict,
    write_diffusers_folder,
    write_hf_cache_repo,
    write_official_pth,
)

CONFIG = SanaConfig(name="tiny", hidden_size=64, depth=2, num_heads=2, caption_channels=48)


@pytest.fixture
def sana_paths(comfy_host, tmp_path, monkeypatch):
    import folder_paths

    weights = tiny_sana_state_dict(CONFIG)
    models = tmp_path / "diffusion_models"
    write_official_pth(models / "Sana_tiny.pth", weights)
    write_diffusers_folder(models / "Sana_tiny_diffusers", CONFIG, weights)
    write_hf_cache_repo(tmp_path / "hub", "Efficient-Large-Model/Sana_tiny_diffusers", CONFIG, weights)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(models)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    yield tmp_path
    folder_paths.filename_list_cache.clear()


def test_sana_dropdown_lists_files_folders_and_cached_repos(sana_paths):
    from velox.host.model_paths import model_choices
    from velox.nodes.sana_nodes import _is_sana_folder

    choices = model_choices("diffusion_models", _is_sana_folder)
    assert "Sana_tiny.pth" in choices
    assert "Sana_tiny_diffusers/" in choices
    assert "hf-cache: Efficient-Large-Model/Sana_tiny_diffusers" in choices


def test_cached_repo_choice_loads_offline_as_a_model(sana_paths):
    from velox.host.model_paths import resolve_model_choice
    from velox.host.sana_loading import load_sana_model

    path = resolve_model_choice("diffusion_models", "hf-cache: Efficient-Large-Model/Sana_tiny_diffusers")
    model = load_sana_model(path)
    assert model.model.diffusion_model.hidden_size == CONFIG.hidden_size


def test_a_vanished_choice_is_a_clear_error(sana_paths):
    from velox.errors import VeloxLoadError
    from velox.host.model_paths import resolve_model_choice

    with pytest.raises(VeloxLoadError, match="gone.pth: not found in models/diffusion_models"):
        resolve_model_choice("diffusion_models", "gone.pth")
    with pytest.raises(VeloxLoadError, match="Org/Missing"):
        resolve_model_choice("diffusion_models", "hf-cache: Org/Missing")

"""Write the tiny checkpoints every example workflow uses, in ComfyUI's standard folders.

    python scripts/make_demo_models.py --models-dir .cache/demo_models

The models are the real architectures at tiny sizes with deterministic random weights, saved in
the real file formats and key layouts, under the file names the example workflows reference
(the names of the real releases, so real weights in ComfyUI's own folders take their place).
``--with-bad-files`` adds the broken inputs the comfy-tier tests feed the loaders.
Re-running is cheap: a stamp records what was written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from velox_import import register_pack  # noqa: E402

DEMO_VERSION = "11"  # bump when a tiny model or a file name changes

SANA_FILE = "diffusion_models/Sana_1600M_1024px_BF16.pth"
SPRINT_FILE = "diffusion_models/Sana_Sprint_1.6B_1024px.pth"
SANA_4K_FILE = "diffusion_models/Sana_1600M_4Kpx_BF16.pth"
GEMMA_FOLDER = "text_encoders/gemma-2-2b-it"
DCAE_FOLDER = "vae/dc-ae-f32c32-sana-1.1-diffusers"
WAN21_T2V_FILE = "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"
WAN21_VACE_FILE = "diffusion_models/wan2.1_vace_1.3B_fp16.safetensors"
WAN22_I2V_HIGH_FILE = "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors"
WAN22_I2V_LOW_FILE = "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors"
UMT5_FILE = "text_encoders/umt5_xxl_fp16.safetensors"
WAN_VAE_FILE = "vae/wan_2.1_vae.safetensors"


def write_sana(models: Path) -> None:
    from velox.models.sana import SanaConfig
    from velox.tiny.gemma import TINY_GEMMA_HIDDEN
    from velox.tiny.sana import tiny_sana_state_dict, write_official_pth

    config = SanaConfig(name="demo_tiny_sana", hidden_size=64, depth=2, num_heads=2,
                        caption_channels=TINY_GEMMA_HIDDEN)
    write_official_pth(models / SANA_FILE, tiny_sana_state_dict(config, seed=0))


def write_sprint(models: Path) -> None:
    """SANA-Sprint style: RMS q/k norm, guidance embedder (cfg_embedder), Sprint's logvar_linear."""
    from velox.tiny.gemma import TINY_GEMMA_HIDDEN
    from velox.tiny.sana import TINY_SANA_CONFIGS, tiny_sana_state_dict, write_official_pth

    config = dataclasses.replace(TINY_SANA_CONFIGS["sprint"], name="demo_tiny_sprint",
                                 caption_channels=TINY_GEMMA_HIDDEN)
    write_official_pth(models / SPRINT_FILE, tiny_sana_state_dict(config, seed=1))


def write_sana_4k(models: Path) -> None:
    """4K style: sincos PE buffer with interpolation 2 (detected from the buffer), flow shift 6."""
    from velox.tiny.gemma import TINY_GEMMA_HIDDEN
    from velox.tiny.sana import TINY_SANA_CONFIGS, tiny_sana_state_dict, write_official_pth

    config = dataclasses.replace(TINY_SANA_CONFIGS["sana_4k_pe"], name="demo_tiny_sana_4k",
                                 caption_channels=TINY_GEMMA_HIDDEN)
    write_official_pth(models / SANA_4K_FILE, tiny_sana_state_dict(config, seed=2))


def write_gemma(models: Path) -> None:
    from velox.tiny.gemma import write_tiny_gemma_hf_folder

    write_tiny_gemma_hf_folder(models / GEMMA_FOLDER, seed=0)


def write_dcae(models: Path) -> None:
    from velox.tiny.dcae import write_dcae_diffusers_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_dcae_diffusers_folder(tmp)
        target = models / DCAE_FOLDER
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, target)


def _tiny_wan_config(kind: str):
    """A tiny Wan transformer that reads the tiny umT5's width (core's detection assumes 4096)."""
    from velox.tiny.wan import TINY_UMT5, TINY_WAN_CONFIGS

    return dataclasses.replace(TINY_WAN_CONFIGS[kind], text_dim=TINY_UMT5["d_model"])


def write_wan21_t2v(models: Path) -> None:
    from velox.tiny.wan import tiny_wan_state_dict, write_comfyui_file

    write_comfyui_file(tiny_wan_state_dict(_tiny_wan_config("t2v"), seed=0), models / WAN21_T2V_FILE)


def write_wan21_vace(models: Path) -> None:
    """Wan 2.1 VACE (vace_patch_embedding + vace_blocks, core's VaceWanModel), ComfyUI layout."""
    from velox.tiny.wan import tiny_wan_state_dict, write_comfyui_file

    write_comfyui_file(tiny_wan_state_dict(_tiny_wan_config("vace"), seed=3), models / WAN21_VACE_FILE)


def write_wan22_i2v(models: Path) -> None:
    """The two Wan 2.2 A14B I2V experts (in_dim 36: noise + mask + image latent), ComfyUI layout."""
    from velox.tiny.wan import tiny_wan_state_dict, write_comfyui_file

    config = _tiny_wan_config("wan22_i2v_expert")
    write_comfyui_file(tiny_wan_state_dict(config, seed=1), models / WAN22_I2V_HIGH_FILE)
    write_comfyui_file(tiny_wan_state_dict(config, seed=2), models / WAN22_I2V_LOW_FILE)


def write_umt5(models: Path) -> None:
    from velox.tiny.wan import write_tiny_umt5_file

    write_tiny_umt5_file(models / UMT5_FILE, seed=0)


def write_wan_vae(models: Path) -> None:
    """The tiny VAE's shapes come from ComfyUI's WanVAE, so the host must be importable."""
    from velox.tiny.wan import tiny_wan_vae_state_dict

    _import_comfy_host()
    save_file({k: v.contiguous() for k, v in tiny_wan_vae_state_dict(seed=0).items()}, str(models / WAN_VAE_FILE))


def _import_comfy_host() -> None:
    """Put ComfyUI ($COMFYUI_PATH, else .host/ComfyUI) on sys.path, set to CPU, unless already importable."""
    if "comfy" in sys.modules:
        return
    host = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".host" / "ComfyUI")
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    saved = sys.argv
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved


def write_bad_files(models: Path) -> None:
    """Broken inputs for the loaders' error tests."""
    from velox.tiny.gemma import write_tiny_gemma_hf_folder

    good = models / "diffusion_models" / "tmp_good.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(64, 32, 1, 1)}, str(good))
    data = good.read_bytes()
    (models / "diffusion_models" / "broken_truncated.safetensors").write_bytes(data[: len(data) // 2])
    good.unlink()
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": argparse.Namespace(model="sana")},
               models / "diffusion_models" / "needs_pickle.pth")
    wan = {"patch_embedding.weight": torch.zeros(32, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(32, 32),
           "blocks.0.cross_attn.k.weight": torch.zeros(32, 32), "head.head.weight": torch.zeros(64, 32)}
    save_file(wan, str(models / "diffusion_models" / "wan_t2v_tiny.safetensors"))
    folder = write_tiny_gemma_hf_folder(models / "text_encoders" / "gemma_without_tokenizer", seed=1)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


WRITERS = {"sana": write_sana, "sana sprint": write_sprint, "sana 4k": write_sana_4k, "gemma": write_gemma,
           "dcae": write_dcae, "wan 2.1 t2v": write_wan21_t2v, "wan 2.1 vace": write_wan21_vace,
           "wan 2.2 i2v experts": write_wan22_i2v,
           "umt5": write_umt5, "wan vae": write_wan_vae}
from demo_models_lora import LORA_WRITERS  # noqa: E402

WRITERS.update(LORA_WRITERS)
from demo_models_gguf import WRITERS as GGUF_WRITERS  # noqa: E402

WRITERS.update(GGUF_WRITERS)
from demo_models_videocrafter import VIDEOCRAFTER_WRITERS  # noqa: E402

WRITERS.update(VIDEOCRAFTER_WRITERS)
from demo_models_controlnet import CONTROLNET_WRITERS  # noqa: E402

WRITERS.update(CONTROLNET_WRITERS)


def family_demo_writers() -> dict:
    """The demo writers the family registry names (each family's ``demo`` hook: models dir -> None)."""
    register_pack()
    from velox.loaders.families import FAMILIES

    return {f"{family.display_name} demo": family.function("demo") for family in FAMILIES.values() if family.demo}


WRITERS.update(family_demo_writers())
from demo_models_training import TRAINING_WRITERS  # noqa: E402

WRITERS.update(TRAINING_WRITERS)
from demo_models_nvfp4 import NVFP4_WRITERS  # noqa: E402  (after the models it converts)

WRITERS.update(NVFP4_WRITERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True, help="a ComfyUI-style models folder")
    parser.add_argument("--with-bad-files", action="store_true", help="also write broken files for tests")
    parser.add_argument("--force", action="store_true", help="rewrite even when the stamp is current")
    args = parser.parse_args(argv)
    models = args.models_dir.resolve()
    stamp = models / ".velox-demo"
    wanted = f"{DEMO_VERSION} bad={args.with_bad_files}"
    if not args.force and stamp.is_file() and stamp.read_text() == wanted:
        print(f"demo models in {models} are current")
        return 0
    register_pack()
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    for name, write in WRITERS.items():
        write(models)
        print(f"wrote tiny {name}")
    if args.with_bad_files:
        write_bad_files(models)
    stamp.write_text(wanted)
    print(f"demo models in {models}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

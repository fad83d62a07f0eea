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
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from velox_import import register_pack  # noqa: E402

DEMO_VERSION = "4"  # bump when a tiny model or a file name changes

SANA_FILE = "diffusion_models/Sana_1600M_1024px_BF16.pth"
SPRINT_FILE = "diffusion_models/Sana_Sprint_1.6B_1024px.pth"
SANA_4K_FILE = "diffusion_models/Sana_1600M_4Kpx_BF16.pth"
GEMMA_FOLDER = "text_encoders/gemma-2-2b-it"
DCAE_FOLDER = "vae/dc-ae-f32c32-sana-1.1-diffusers"


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
           "dcae": write_dcae}


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

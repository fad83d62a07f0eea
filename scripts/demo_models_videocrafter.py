"""Tiny VideoCrafter 2 and DynamiCrafter 512 release files, named as users name the real ones.

The real releases are Lightning ``model.ckpt`` files (VideoCrafter/VideoCrafter2, Doubiiu/DynamiCrafter_512
on Hugging Face) that users rename when they drop them in ``models/checkpoints``; the demo files use
``videocrafter2_t2v.ckpt`` and ``dynamicrafter_512.ckpt`` and the same layout: ``{"state_dict": ...}``
with ``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.model.`` and, for
DynamiCrafter, ``embedder.model.visual.`` and ``image_proj_model.`` keys (``tiny.videocrafter``).
"""

from __future__ import annotations

from pathlib import Path

import torch

VC2_FILE = "checkpoints/videocrafter2_t2v.ckpt"
DC512_FILE = "checkpoints/dynamicrafter_512.ckpt"


def write_release_ckpt(path: Path, kind: str, seed: int) -> Path:
    from velox.tiny.videocrafter import demo_release_state_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": demo_release_state_dict(kind, seed=seed), "global_step": 0}, path)
    return path


def write_videocrafter2(models: Path) -> None:
    write_release_ckpt(models / VC2_FILE, "vc2", seed=0)


def write_dynamicrafter(models: Path) -> None:
    write_release_ckpt(models / DC512_FILE, "dc512", seed=1)


VIDEOCRAFTER_WRITERS = {"videocrafter 2": write_videocrafter2, "dynamicrafter 512": write_dynamicrafter}

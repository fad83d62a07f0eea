"""The tiny video dataset the LoRA-training example workflows train on.

    models/training_data/velox_demo_clips/  clip_0.gif + clip_0.txt, ... (same-name captions)

Animated GIFs (PIL writes them; no video codec needed) of a coloured square moving across a
gradient, 24 frames at 8 fps, 48x48 pixels: small enough that encoding them through the tiny demo
VAEs takes a second, and a pattern the tiny models can learn. ``VeloxLoraDataset`` finds the folder
by its name (``velox_demo_clips``) in the ``training_data`` models folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DATASET_FOLDER = "training_data/velox_demo_clips"
CLIPS = (  # (caption, square colour, direction)
    ("a red square gliding to the right over a blue gradient", (220, 40, 40), (1, 0)),
    ("a yellow square sliding down over a blue gradient", (230, 210, 40), (0, 1)),
)
SIDE, FRAMES, SQUARE, FPS = 48, 24, 14, 8


def clip_frames(colour: tuple[int, int, int], direction: tuple[int, int]) -> list[Image.Image]:
    ramp = np.linspace(30, 160, SIDE, dtype=np.float32)
    background = np.stack([ramp[None, :].repeat(SIDE, 0) * 0.3, ramp[:, None].repeat(SIDE, 1) * 0.6,
                           np.full((SIDE, SIDE), 170.0)], axis=-1)
    frames = []
    for index in range(FRAMES):
        frame = background.copy()
        offset = round(index * (SIDE - SQUARE) / (FRAMES - 1))
        x, y = offset * direction[0] + 4 * direction[1], offset * direction[1] + 4 * direction[0]
        frame[y:y + SQUARE, x:x + SQUARE] = colour
        frames.append(Image.fromarray(frame.astype(np.uint8)))
    return frames


def write_training_data(models: Path) -> Path:
    folder = models / DATASET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for index, (caption, colour, direction) in enumerate(CLIPS):
        frames = clip_frames(colour, direction)
        frames[0].save(folder / f"clip_{index}.gif", save_all=True, append_images=frames[1:],
                       duration=1000 // FPS, loop=0)
        (folder / f"clip_{index}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


TRAINING_WRITERS = {"lora training clips": write_training_data}

"""A training run's loss curve as a picture: raw losses in light blue, a moving mean in dark blue."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def moving_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def loss_curve_image(losses: Sequence[float], title: str = "") -> Image.Image:
    """A white RGB plot of ``losses`` against the step, with the first, last and minimum values written."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0

        def point(i: int, value: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (value - low) / span

        for series, colour in ((list(losses), (150, 190, 255)), (moving_mean(losses, max(1, len(losses) // 20)),
                                                                  (20, 60, 200))):
            draw.line([point(i, v) for i, v in enumerate(series)] if len(series) > 1 else [point(0, series[0])] * 2,
                      fill=colour, width=2)
        draw.text((left, bottom + 6), f"step 1 .. {len(losses)}   first {losses[0]:.4g}   last {losses[-1]:.4g}   "
                  f"min {low:.4g}", fill="black")
        draw.text((4, top), f"{high:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{low:.3g}", fill="black")
    draw.text((left, 4), title or "training loss", fill="black")
    return image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]

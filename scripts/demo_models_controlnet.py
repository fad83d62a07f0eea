"""A tiny demo Sana ControlNet for the tiny demo Sana transformer, under the real release name.

``controlnet/Sana_1600M_1024px_BF16_ControlNet_HED.pth`` in the official layout (the whole
SanaMSControlNet: base blocks plus ``controlnet.N.{copied_block, before_proj, after_proj}``), with the
width and caption channels of ``make_demo_models.write_sana``'s transformer and two copied blocks.
Random projections, so that the demo's control visibly reaches the image: they prove the wiring.
"""

from __future__ import annotations

from pathlib import Path

CONTROLNET_FILE = "controlnet/Sana_1600M_1024px_BF16_ControlNet_HED.pth"
COPIED_BLOCKS = 2


def write_sana_controlnet(models: Path) -> None:
    from velox.models.sana import SanaConfig
    from velox.tiny.gemma import TINY_GEMMA_HIDDEN
    from velox.tiny.sana_controlnet import tiny_sana_controlnet_state_dict, write_official_controlnet

    config = SanaConfig(name="demo_tiny_sana", hidden_size=64, depth=2, num_heads=2,
                        caption_channels=TINY_GEMMA_HIDDEN)
    state_dict = tiny_sana_controlnet_state_dict(config, COPIED_BLOCKS, seed=5)
    write_official_controlnet(models / CONTROLNET_FILE, state_dict)


CONTROLNET_WRITERS = {"sana controlnet": write_sana_controlnet}

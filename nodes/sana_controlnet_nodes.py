"""Sana ControlNet loader: a Sana ControlNet file or folder as core's CONTROL_NET.

Glue only: core's 'Apply ControlNet' (ControlNetApplyAdvanced) applies it, with the Sana DC-AE VAE
connected so that the control image is encoded into Sana's latent space.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..host.model_paths import model_choices, resolve_model_choice
from .queue_validation import VeloxNode
from .sana_nodes import DTYPES

CATEGORY = "Velox/Sana"


def _is_sana_controlnet_folder(path) -> bool:
    for config in (path / "controlnet" / "config.json", path / "config.json"):
        if config.is_file():
            return "SanaControlNetModel" in config.read_text(errors="ignore")
    return False


class SanaControlNetLoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSanaControlNetLoader",
            display_name="Load Sana ControlNet (Velox)",
            category=CATEGORY,
            description="Loads a Sana ControlNet (official Sana_*_ControlNet_HED .pth or a diffusers "
            "SanaControlNetModel file or folder) as a CONTROL_NET for core 'Apply ControlNet': connect the "
            "Sana DC-AE VAE there; strength and start / end percent work as for any ControlNet, and several "
            "ControlNets chain. The control image must have the generated image's aspect ratio.",
            inputs=[
                io.Combo.Input("controlnet_name", options=model_choices("controlnet", _is_sana_controlnet_folder),
                               tooltip="A file or diffusers folder in models/controlnet, or a cached repository."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="Weight precision; 'default' lets ComfyUI pick for this GPU."),
            ],
            outputs=[io.ControlNet.Output()],
        )

    @classmethod
    def execute(cls, controlnet_name, weight_dtype) -> io.NodeOutput:
        from ..host.sana_controlnet import load_sana_controlnet

        path = resolve_model_choice("controlnet", controlnet_name)
        return io.NodeOutput(load_sana_controlnet(path, dtype=DTYPES[weight_dtype]))


SANA_CONTROLNET_NODES = [SanaControlNetLoader]

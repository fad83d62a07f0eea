"""The V3 extension ComfyUI loads: every Velox node, in one list."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .lora_nodes import LORA_NODES
from .lora_training_nodes import LORA_TRAINING_NODES
from .sampler_nodes import SAMPLER_NODES
from .sana_controlnet_nodes import SANA_CONTROLNET_NODES
from .sana_guidance_nodes import SANA_GUIDANCE_NODES
from .sana_nodes import SANA_NODES
from .sana_video_nodes import SANA_VIDEO_NODES
from .videocrafter_nodes import VIDEOCRAFTER_NODES
from .wan_nodes import WAN_LOADER_NODES
from .wan_sampling_nodes import WAN_SAMPLING_NODES


class VeloxExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*SANA_NODES, *SANA_CONTROLNET_NODES, *SAMPLER_NODES, *SANA_GUIDANCE_NODES, *WAN_LOADER_NODES, *WAN_SAMPLING_NODES,
                *LORA_NODES, *VIDEOCRAFTER_NODES, *LORA_TRAINING_NODES, *SANA_VIDEO_NODES]

"""Velox: Sana, Wan and VideoCrafter for ComfyUI, natively and fast.

ComfyUI imports this file as the pack's entry. Only `comfy_entrypoint` is exported (a V3
extension); importing the package itself touches no ComfyUI module, so the pure layers
(`models/`, `kernels/`, `loaders/`) stay importable from tests and scripts.
"""


async def comfy_entrypoint():
    from .nodes.extension import VeloxExtension

    return VeloxExtension()

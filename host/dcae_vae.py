"""Sana's DC-AE as a native ComfyUI `VAE`: core's `AutoencoderDC` port, our detection, seam-free tiling.

The network is ComfyUI core's `comfy/ldm/ace/vae/autoencoder_dc.py` (diffusers-keyed, built on
`comfy.ops`), constructed with the config `loaders.dcae_keys` reads from the file. The object is a
`comfy.sd.VAE`, so core's VAEDecode / VAEEncode / VAEDecodeTiled and every node taking a VAE accept it.
The latent scale (0.41407) belongs to the model's latent format, so the autoencoder runs unscaled here.

Tiled decode: DC-AE's linear attention sees the whole tile, so small tiles change the picture and show
seams (diffusers#10510 reports seams in flat areas with 512 px tiles and recommends 1024). Tiles are at
least 1024 px, spread evenly, and blended with raised-cosine weights across each overlap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.utils
import torch
from comfy.ldm.ace.vae.autoencoder_dc import AutoencoderDC

from ..errors import VeloxLoadError
from ..loaders.dcae_keys import EXPECTED_DCAE, DCAEConfig, prepare_dcae_state_dict

DEFAULT_TILE_PX = 1024
DEFAULT_OVERLAP_PX = 128
# Measured on an H100 (bench/RESULTS.md, DC-AE decode): channels_last gains nothing eager (58.8 vs 59.2 ms
# at 1024²) and breaks inductor's compile of the decoder, so the weights stay in the default layout
DCAE_MEMORY_FORMAT = torch.contiguous_format
MIN_TILE_PX = 1024  # smaller tiles seam in flat areas (diffusers#10510)
MIN_OVERLAP_PX = 128

# Peak activation memory in elements per image pixel for the Sana config, measured on an H100 in bf16
# (the same at 1024, 2048 and 4096 px): decode 577 (peaks at full resolution), encode 643. Rounded up
# by about 1.3x, as core's own estimates are.
DECODE_ELEMENTS_PER_PIXEL = 750
ENCODE_ELEMENTS_PER_PIXEL = 850


class DCAEVAE(comfy.sd.VAE):
    """A `comfy.sd.VAE` holding core's `AutoencoderDC` (Sana DC-AE f32c32 or any detected DC-AE)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        # core's __init__ sniffs its own families from the keys; everything it sets is set here instead
        config, sd = prepare_dcae_state_dict(state_dict, path)
        self.dcae_config: DCAEConfig = config
        ratio = config.spatial_compression
        # 1. what core's VAE methods read
        self.memory_used_encode = lambda shape, dtype: (
            ENCODE_ELEMENTS_PER_PIXEL * shape[-2] * shape[-1] * comfy.model_management.dtype_size(dtype))
        self.memory_used_decode = lambda shape, dtype: (
            DECODE_ELEMENTS_PER_PIXEL * shape[-2] * shape[-1] * ratio * ratio * comfy.model_management.dtype_size(dtype))
        self.downscale_ratio = ratio
        self.upscale_ratio = ratio
        self.latent_channels = config.latent_channels
        self.latent_dim = 2
        self.output_channels = config.in_channels
        self.process_input = _pixels_to_model if config.has_encoder else _decoder_only(path)
        self.process_output = _model_to_pixels
        self.working_dtypes = [torch.bfloat16, torch.float32]  # Sana: DC-AE in bf16 or fp32 only (NVlabs/Sana#147)
        self.disable_offload = False
        self.not_video = True
        self.size = None
        self.downscale_index_formula = None
        self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        # 2. the network, scale 1 (the latent format applies 0.41407)
        self.first_stage_model = AutoencoderDC(**config.autoencoder_kwargs(), scaling_factor=1.0).eval()
        missing, unexpected = self.first_stage_model.load_state_dict(sd, strict=False)
        if not config.has_encoder:
            missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise VeloxLoadError(path, f"DC-AE tensors do not fit the detected architecture: missing "
                                 f"{missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})",
                                 EXPECTED_DCAE)
        # 3. placement, as core does it
        self.device = device if device is not None else comfy.model_management.vae_device()
        offload_device = comfy.model_management.vae_offload_device()
        self.vae_dtype = dtype if dtype is not None else comfy.model_management.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype, memory_format=DCAE_MEMORY_FORMAT)
        self.output_device = comfy.model_management.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.first_stage_model, load_device=self.device, offload_device=offload_device)
        logging.info("Velox DC-AE: load device %s, offload device %s, dtype %s", self.device, offload_device,
                     self.vae_dtype)
        self.model_size()

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Core's VAEDecodeTiled entry (sizes in latent units): (B, C, h, w) -> IMAGE (B, H, W, 3).

        Sizes below the seam-free minimum (1024 px tiles, 128 px overlap) are raised to it, so the node's
        512 px default still decodes without seams.
        """
        self.throw_exception_if_invalid()
        return _decode_tiles(self, samples, *_tile_plan(self, tile_x, tile_y, overlap)).movedim(1, -1)

    def decode_tiled_(self, samples, tile_x=None, tile_y=None, overlap=None):
        """Core's out-of-memory fallback inside `decode`: one blended pass instead of core's three."""
        return _decode_tiles(self, samples, *_tile_plan(self, tile_x, tile_y, overlap))


def _pixels_to_model(image: torch.Tensor) -> torch.Tensor:
    return image * 2.0 - 1.0


def _model_to_pixels(image: torch.Tensor) -> torch.Tensor:
    return torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)


def _decoder_only(path):
    def refuse(image: torch.Tensor) -> torch.Tensor:
        raise VeloxLoadError(path, "this DC-AE file holds only the decoder, so it cannot encode images",
                             "a DC-AE file with encoder.* weights for VAEEncode")
    return refuse


def load_dcae_vae(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None,
                  dtype: torch.dtype | None = None) -> comfy.sd.VAE:
    """Any DC-AE state dict (diffusers or efficientvit layout, any known prefix) -> a ComfyUI `VAE`.

    Raises `VeloxLoadError` naming `path` when the tensors are not a DC-AE.
    """
    return DCAEVAE(state_dict, path=path, dtype=dtype)


# --- tiled decode --------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal `tile`-long windows spread evenly over `length`, neighbours sharing >= `overlap`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _blend_ramp(starts: list[int], index: int, tile: int, length: int) -> torch.Tensor:
    """1-D weight of one tile: raised-cosine rise over the overlap with the previous tile, fall into the next.

    Weights are never zero inside a tile, so the normalised sum is defined everywhere.
    """
    start, size = starts[index], min(tile, length)
    weight = torch.ones(size)
    position = torch.arange(size, dtype=torch.float32) + 0.5
    if index > 0:
        rise = starts[index - 1] + tile - start
        weight = torch.minimum(weight, _raised_cosine(position / rise))
    if index < len(starts) - 1:
        fall = start + tile - starts[index + 1]
        weight = torch.minimum(weight, _raised_cosine((size - position) / fall))
    return weight


def _raised_cosine(t: torch.Tensor) -> torch.Tensor:
    return 0.5 - 0.5 * torch.cos(math.pi * t.clamp(0.0, 1.0))


def _tile_plan(vae: comfy.sd.VAE, tile_x, tile_y, overlap) -> tuple[int, int, int]:
    """Latent tile sizes and overlap, raised to the seam-free minimum of 1024 / 128 px."""
    ratio = vae.spacial_compression_decode()
    tile_x = max(tile_x or DEFAULT_TILE_PX // ratio, MIN_TILE_PX // ratio)
    tile_y = max(tile_y or tile_x, MIN_TILE_PX // ratio)
    overlap = max(overlap or DEFAULT_OVERLAP_PX // ratio, MIN_OVERLAP_PX // ratio)
    return tile_x, tile_y, min(overlap, min(tile_x, tile_y) // 2)


@torch.no_grad()
def _decode_tiles(vae: comfy.sd.VAE, samples: torch.Tensor, tile_x: int, tile_y: int, overlap: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) pixels in [0, 1], one blended pass, progress per tile."""
    ratio = vae.spacial_compression_decode()
    batch, _, height, width = samples.shape
    rows, cols = tile_starts(height, tile_y, overlap), tile_starts(width, tile_x, overlap)
    row_px, col_px = [s * ratio for s in rows], [s * ratio for s in cols]
    tiles = [(r, c) for r in range(len(rows)) for c in range(len(cols))]
    output = torch.zeros(batch, vae.output_channels, height * ratio, width * ratio, device=vae.output_device)
    weight_sum = torch.zeros(height * ratio, width * ratio, device=vae.output_device)
    tile_shape = (1, samples.shape[1], min(tile_y, height), min(tile_x, width))
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(tile_shape, vae.vae_dtype),
                                           force_full_load=vae.disable_offload)
    progress = comfy.utils.ProgressBar(batch * len(tiles))
    for b in range(batch):
        for r, c in tiles:
            comfy.model_management.throw_exception_if_processing_interrupted()
            y, x = rows[r], cols[c]
            latent = samples[b:b + 1, :, y:y + tile_y, x:x + tile_x].to(vae.device, vae.vae_dtype)
            pixels = vae.first_stage_model.decode(latent).to(vae.output_device, torch.float32)
            weight = (_blend_ramp(row_px, r, tile_y * ratio, height * ratio)[:, None]
                      * _blend_ramp(col_px, c, tile_x * ratio, width * ratio)[None, :]).to(vae.output_device)
            region = (slice(y * ratio, y * ratio + pixels.shape[-2]), slice(x * ratio, x * ratio + pixels.shape[-1]))
            output[b:b + 1, :, region[0], region[1]] += pixels * weight
            if b == 0:
                weight_sum[region] += weight
            progress.update(1)
    return vae.process_output(output / weight_sum)


def decode_tiled_dcae(vae: comfy.sd.VAE, latent: torch.Tensor, tile_px: int = DEFAULT_TILE_PX,
                      overlap_px: int | None = DEFAULT_OVERLAP_PX, tile_px_y: int | None = None) -> torch.Tensor:
    """Decode (B, C, h, w) latents in tiles of at least 1024 px: IMAGE (B, H, W, 3) in [0, 1].

    Tiles share at least `overlap_px` (raised to 128) and are blended with raised-cosine weights; the
    ProgressBar ticks once per tile and a queue interrupt stops between tiles.
    """
    ratio = vae.spacial_compression_decode()
    plan = _tile_plan(vae, tile_px // ratio, (tile_px_y // ratio) if tile_px_y else None,
                      (overlap_px // ratio) if overlap_px else None)
    return _decode_tiles(vae, latent, *plan).movedim(1, -1)

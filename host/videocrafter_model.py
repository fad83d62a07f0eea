"""VideoCrafter / DynamiCrafter inside ComfyUI: BaseModel subclass, model config, model sampling.

The network is Velox's pure-PyTorch ``UNet3D`` (core has no 3D UNet of this kind) with ComfyUI's
``optimized_attention`` swapped in, so sage / xformers / SDPA follow ComfyUI's flags. The I2V image
projection (``image_proj_model``, a Resampler) lives inside the diffusion model: conditioning carries
raw CLIP-vision tokens (``clip_vision_tokens``, pre-``ln_post`` ViT-H states) and the model resamples
them, so ComfyUI's padding of cross-attention conds never touches the per-frame image tokens.

Model sampling: ComfyUI's ``ModelSamplingDiscrete`` with the release's betas (SD scaled-linear
0.00085-0.012; zero terminal SNR for DynamiCrafter 512/1024) and EPS or V_PREDICTION. KSampler works
with it; the exact reference sampler (timestep-scaled x0) is ``host.videocrafter_sampling``.
"""

from __future__ import annotations

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.ops
import comfy.supported_models_base
import torch
from comfy.ldm.modules.attention import optimized_attention

from ..loaders.videocrafter_detect import VideoCrafterVariant
from ..models.resampler import Resampler, ResamplerConfig
from ..models.unet3d import UNet3D, UNet3DConfig


class VideoCrafterUNet(UNet3D):
    """UNet3D + optional Resampler, called the way ComfyUI's BaseModel calls a diffusion model.

    x (B, C_in, T, H, W) (ComfyUI already concatenated ``c_concat``), timesteps (B,) float,
    context (B, 77, D) text; ``clip_vision_tokens`` (B, N, 1280) are resampled and appended.
    """

    def __init__(self, config: UNet3DConfig, resampler: ResamplerConfig | None = None, dtype=None,
                 device=None, operations=None, **_ignored):
        operations = operations or comfy.ops.disable_weight_init
        super().__init__(config, device=device, dtype=dtype, operations=operations, attention=optimized_attention)
        if resampler is not None:
            self.image_proj_model = Resampler(resampler, device=device, dtype=dtype, operations=operations)

    def image_context(self, clip_vision_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.image_proj_model(clip_vision_tokens.to(dtype))

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, fps=None,
                clip_vision_tokens=None, **kwargs):
        context = context[:, :77].to(x.dtype)  # lvdm's OpenCLIP embedder truncates at 77 tokens
        if clip_vision_tokens is not None and hasattr(self, "image_proj_model"):
            context = torch.cat([context, self.image_context(clip_vision_tokens, x.dtype)], dim=1)
        if fps is not None:
            fps = fps.reshape(-1).float().round().long()
        return super().forward(x, timesteps, context, fps=fps)


class VideoCrafterModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI's view of a VideoCrafter checkpoint; ``unet_config`` holds the UNet3D/Resampler configs."""

    unet_extra_config = {}
    sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}
    latent_format = comfy.latent_formats.SD15
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    memory_usage_factor = 3.0  # activation estimate per latent voxel vs SD1.5; set loosely, not measured

    def __init__(self, variant: VideoCrafterVariant):
        super().__init__({"config": variant.unet, "resampler": variant.resampler})
        self.velox_variant = variant
        self.sampling_settings["zsnr"] = variant.schedule.zero_terminal_snr

    def get_model(self, state_dict, prefix="", device=None):
        v = self.velox_variant
        model_type = comfy.model_base.ModelType.V_PREDICTION if v.schedule.prediction == "v" else \
            comfy.model_base.ModelType.EPS
        return VideoCrafterModel(self, model_type, device=device)


class VideoCrafterModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.EPS, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=VideoCrafterUNet)

    @property
    def velox_variant(self) -> VideoCrafterVariant:
        return self.model_config.velox_variant

    def get_dtype(self):
        """The UNet's compute dtype; packed weights (GGUF bytes, fp8, int8) do not count."""
        floats = (p.dtype for p in self.diffusion_model.parameters() if p.is_floating_point() and p.element_size() > 1)
        return next(floats, torch.float32)

    def extra_conds(self, **kwargs):
        """For core samplers: the I2V image latent (raw, from the conditioning node) repeated over the
        frames as ``c_concat``, the CLIP-vision tokens, and the release's fps (or ``videocrafter_fps``)."""
        out = super().extra_conds(**kwargs)
        noise = kwargs.get("noise", None)
        if "videocrafter_image_latent" in kwargs and self.velox_variant.concat_image and noise is not None:
            from .videocrafter_sampling import concat_latent

            image = concat_latent(self, kwargs, noise.shape[2], noise.shape[-2:])
            out["c_concat"] = comfy.conds.CONDNoiseShape(image)
        tokens = kwargs.get("clip_vision_tokens", None)
        if tokens is not None and self.velox_variant.is_i2v:
            out["clip_vision_tokens"] = comfy.conds.CONDRegular(tokens)
        fps = kwargs.get("videocrafter_fps", self.velox_variant.preset.fps)
        out["fps"] = comfy.conds.CONDRegular(torch.tensor([float(fps)]))
        return out

"""Tiny VideoCrafter / DynamiCrafter UNets of the real architecture, with deterministic weights.

Used by the golden-tensor parity tests (``tests/unit/test_videocrafter_unet.py``) and the script that
regenerates them from the lvdm reference (``scripts/golden/make_videocrafter_golden.py``). The weights
are not stored: ``deterministic_weights`` draws every tensor from a generator seeded by the key name,
so ours and the reference (same key names) receive identical weights. Each variant keeps the flags of
its release and shrinks the widths: model_channels 32, channel_mult (1, 2), one ResBlock per level,
16-dim heads, context 32, 4 frames of 8x8 latents.

``demo_release_state_dict`` makes whole tiny release files (UNet, KL VAE, OpenCLIP text, and for
DynamiCrafter the CLIP visual tower and Resampler) under lvdm's key prefixes, for the demo checkpoints
and the host tests.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch

from ..models.resampler import ResamplerConfig
from ..models.unet3d import UNet3DConfig

FRAMES = 4
LATENT_SIDE = 8
TEXT_TOKENS = 77
IMAGE_TOKENS = 5  # tiny CLIP-vision token count (ViT-H has 257)

_BASE = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
             num_head_channels=16, context_dim=32, temporal_length=FRAMES)

TINY_UNETS: dict[str, UNet3DConfig] = {
    "vc1": UNet3DConfig(**_BASE, temporal_conv=False, use_relative_position=True, fps_cond=False),
    "vc2": UNet3DConfig(**_BASE),
    "vc1_i2v": UNet3DConfig(**_BASE, image_cross_attention=True),
    "dc256": UNet3DConfig(**_BASE, in_channels=8, image_cross_attention=True,
                          image_cross_attention_scale_learnable=True, default_fps=3),
    "dc512": UNet3DConfig(**_BASE, in_channels=8, image_cross_attention=True, default_fps=24),
}
# Resamplers: VideoCrafter 1 I2V shares 16 queries by all frames; DynamiCrafter has 16 per frame.
TINY_RESAMPLERS: dict[str, ResamplerConfig] = {
    "vc1_i2v": ResamplerConfig(dim=32, depth=2, dim_head=16, heads=2, num_queries=16, embedding_dim=48,
                               output_dim=32, ff_mult=2, video_length=None),
    "dc": ResamplerConfig(dim=32, depth=2, dim_head=16, heads=2, num_queries=16, embedding_dim=48,
                          output_dim=32, ff_mult=2, video_length=FRAMES),
}


def _seed(key: str, seed: int) -> int:
    return (zlib.crc32(key.encode()) + 7919 * seed) % (2**31)


def deterministic_tensor(key: str, shape: Iterable[int], seed: int = 0) -> torch.Tensor:
    """float32 tensor for one parameter, from a generator seeded by its name.

    Norm weights ~ 1 + 0.1 N, vectors (biases) ~ 0.1 N, matrices ~ N / sqrt(fan_in), so activations
    stay O(1) through the tiny network and every branch (zero-initialised in the releases) is live.
    """
    shape = tuple(shape)
    g = torch.Generator().manual_seed(_seed(key, seed))
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) == 0:
        return noise * 0.5
    if len(shape) == 1:
        is_norm_weight = key.endswith(".weight")
        return 1.0 + 0.1 * noise if is_norm_weight else 0.1 * noise
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return noise / fan_in**0.5


def deterministic_weights(shapes: dict[str, Iterable[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """{key: tensor} for a {key: shape} map (a module's state dict keys and shapes)."""
    return {key: deterministic_tensor(key, shape, seed) for key, shape in shapes.items()}


def fill_deterministic(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Load ``deterministic_weights`` into every parameter of ``module`` (in place); returns it."""
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    module.load_state_dict(deterministic_weights(shapes, seed))
    return module


def weights_checksum(module: torch.nn.Module) -> float:
    """Sum of |w| over all weights, stored beside the goldens to detect a change of generator."""
    return float(sum(v.double().abs().sum() for v in module.state_dict().values()))


# ---------------------------------------------------------------------------------------------- demo files
# Whole release files (UNet + KL VAE + OpenCLIP text [+ visual + Resampler]) under lvdm's prefixes, small
# enough to sample 16 frames on a CPU in seconds. Heads are 32 wide, as wide as the 32-channel UNet (the
# loader reads the width from init_attn's proj_in, 8 heads x width rows). The text tower is 64 wide
# with 3 layers (the penultimate layer must not be the first), the vision tower 64 wide with 2; the VAE
# is KL-f8 with base width 32 and ch_mult (1, 1, 1, 1).
DEMO_WIDTH = 64
DEMO_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                 num_head_channels=32, context_dim=DEMO_WIDTH)
DEMO_RELEASES: dict[str, UNet3DConfig] = {
    "vc2": UNet3DConfig(**DEMO_UNET),
    "dc512": UNet3DConfig(**DEMO_UNET, in_channels=8, image_cross_attention=True, default_fps=24),
}
DEMO_RESAMPLER = ResamplerConfig(dim=DEMO_WIDTH, depth=1, dim_head=64, heads=1, num_queries=16,
                                 embedding_dim=DEMO_WIDTH, output_dim=DEMO_WIDTH, ff_mult=2, video_length=16)
DEMO_VAE = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z=4)
VOCAB, TEXT_POSITIONS, VISION_PATCH, VISION_IMAGE = 49408, 77, 32, 224


def _resnet_shapes(prefix: str, c_in: int, c_out: int) -> dict[str, tuple]:
    shapes = {f"{prefix}.norm1.weight": (c_in,), f"{prefix}.norm1.bias": (c_in,),
              f"{prefix}.conv1.weight": (c_out, c_in, 3, 3), f"{prefix}.conv1.bias": (c_out,),
              f"{prefix}.norm2.weight": (c_out,), f"{prefix}.norm2.bias": (c_out,),
              f"{prefix}.conv2.weight": (c_out, c_out, 3, 3), f"{prefix}.conv2.bias": (c_out,)}
    if c_in != c_out:
        shapes.update({f"{prefix}.nin_shortcut.weight": (c_out, c_in, 1, 1), f"{prefix}.nin_shortcut.bias": (c_out,)})
    return shapes


def _mid_shapes(prefix: str, c: int) -> dict[str, tuple]:
    shapes = {**_resnet_shapes(f"{prefix}.block_1", c, c), **_resnet_shapes(f"{prefix}.block_2", c, c)}
    for name in ("q", "k", "v", "proj_out"):
        shapes.update({f"{prefix}.attn_1.{name}.weight": (c, c, 1, 1), f"{prefix}.attn_1.{name}.bias": (c,)})
    shapes.update({f"{prefix}.attn_1.norm.weight": (c,), f"{prefix}.attn_1.norm.bias": (c,)})
    return shapes


def kl_vae_shapes(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z: int) -> dict[str, tuple]:
    """Key shapes of the LDM AutoencoderKL (SD names: encoder.down.N.block.M ..., quant_conv)."""
    s: dict[str, tuple] = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    block_in = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            s.update(_resnet_shapes(f"encoder.down.{i}.block.{j}", block_in, ch * mult))
            block_in = ch * mult
        if i != len(ch_mult) - 1:
            s.update({f"encoder.down.{i}.downsample.conv.weight": (block_in, block_in, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (block_in,)})
    s.update(_mid_shapes("encoder.mid", block_in))
    s.update({"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,),
              "encoder.conv_out.weight": (2 * z, block_in, 3, 3), "encoder.conv_out.bias": (2 * z,)})
    block_in = ch * ch_mult[-1]
    s.update({"decoder.conv_in.weight": (block_in, z, 3, 3), "decoder.conv_in.bias": (block_in,)})
    s.update(_mid_shapes("decoder.mid", block_in))
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            s.update(_resnet_shapes(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i]))
            block_in = ch * ch_mult[i]
        if i != 0:
            s.update({f"decoder.up.{i}.upsample.conv.weight": (block_in, block_in, 3, 3),
                      f"decoder.up.{i}.upsample.conv.bias": (block_in,)})
    s.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,),
              "decoder.conv_out.weight": (3, block_in, 3, 3), "decoder.conv_out.bias": (3,),
              "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
              "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)})
    return s


def _openclip_blocks(prefix: str, width: int, layers: int) -> dict[str, tuple]:
    s: dict[str, tuple] = {}
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        s.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                  p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                  p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                  p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                  p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
                  p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,)})
    return s


def openclip_text_shapes(width: int = DEMO_WIDTH, layers: int = 3) -> dict[str, tuple]:
    """``cond_stage_model.model.*`` of lvdm's FrozenOpenCLIPEmbedder (OpenCLIP text tower)."""
    p = "cond_stage_model.model."
    return {p + "token_embedding.weight": (VOCAB, width), p + "positional_embedding": (TEXT_POSITIONS, width),
            **_openclip_blocks(p, width, layers), p + "ln_final.weight": (width,), p + "ln_final.bias": (width,),
            p + "text_projection": (width, width), p + "logit_scale": ()}


def openclip_visual_shapes(width: int = DEMO_WIDTH, layers: int = 2) -> dict[str, tuple]:
    """``embedder.model.visual.*`` of FrozenOpenCLIPImageEmbedderV2 (OpenCLIP ViT visual tower)."""
    p = "embedder.model.visual."
    positions = (VISION_IMAGE // VISION_PATCH) ** 2 + 1
    return {p + "conv1.weight": (width, 3, VISION_PATCH, VISION_PATCH), p + "class_embedding": (width,),
            p + "positional_embedding": (positions, width), p + "ln_pre.weight": (width,), p + "ln_pre.bias": (width,),
            **_openclip_blocks(p, width, layers), p + "ln_post.weight": (width,), p + "ln_post.bias": (width,),
            p + "proj": (width, width)}


def demo_release_state_dict(kind: str, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A whole tiny release file's tensors: ``kind`` "vc2" (T2V) or "dc512" (DynamiCrafter I2V)."""
    from ..models.resampler import Resampler
    from ..models.unet3d import UNet3D

    with torch.device("meta"):
        unet = UNet3D(DEMO_RELEASES[kind])
    shapes = {f"model.diffusion_model.{k}": v.shape for k, v in unet.state_dict().items()}
    shapes.update({f"first_stage_model.{k}": v for k, v in kl_vae_shapes(**DEMO_VAE).items()})
    shapes.update(openclip_text_shapes())
    if kind.startswith("dc"):
        with torch.device("meta"):
            proj = Resampler(DEMO_RESAMPLER)
        shapes.update({f"image_proj_model.{k}": v.shape for k, v in proj.state_dict().items()})
        shapes.update(openclip_visual_shapes())
    return {k: v.to(dtype) for k, v in deterministic_weights(shapes, seed).items()}

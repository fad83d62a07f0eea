"""Tiny demo LoRAs for the tiny Wan 2.2 A14B I2V experts, under the real release names.

- The four Wan2.2-Fun reward LoRAs (``Wan2.2-Fun-A14B-InP-{high,low}-noise-{MPS,HPS2.1}.safetensors``,
  alibaba-pai/Wan2.2-Fun-Reward-LoRAs) in VideoX-Fun's kohya format with the double underscore
  (``lora_unet__blocks_0_self_attn_q.lora_down.weight`` + ``.alpha``) on the layers VideoX-Fun wraps
  with ``--lora_skip_name ffn``: attention q/k/v/o and the non-block Linears. Real files are rank 128 /
  alpha 64; the tiny ones keep alpha / rank = 0.5 at rank 16.
- The Lightning 4-step LoRAs as ComfyUI's Wan 2.2 I2V template names them
  (``wan2.2_i2v_lightx2v_4steps_lora_v1_{high,low}_noise.safetensors``), in LightX2V's official
  ``diffusion_model.*.lora_down/lora_up/alpha`` format on every Linear, alpha / rank = 1 / 8 as released.

Random factors, small enough that the demo's video stays a (noise-like) video: they prove the
wiring, not the effect.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from safetensors.torch import save_file

REWARD_RANK, REWARD_ALPHA = 16, 8.0
LIGHTNING_RANK, LIGHTNING_ALPHA = 8, 1.0
LIGHTNING_FILES = {"high": "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
                   "low": "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"}
REWARD_SKIP = re.compile(r"\.ffn\.")  # VideoX-Fun trains the reward LoRAs with --lora_skip_name ffn


def _expert_linear_shapes() -> dict[str, tuple[int, int]]:
    """Module -> (out, in) of every 2-D Linear weight of the tiny Wan 2.2 I2V expert the demo writes."""
    from velox.tiny.wan import TINY_UMT5, TINY_WAN_CONFIGS, wan_official_shapes

    config = dataclasses.replace(TINY_WAN_CONFIGS["wan22_i2v_expert"], text_dim=TINY_UMT5["d_model"])
    return {key.removesuffix(".weight"): shape for key, shape in wan_official_shapes(config).items()
            if key.endswith(".weight") and len(shape) == 2}


def _write(models: Path, name: str, tensors: dict) -> None:
    path = models / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def write_reward_loras(models: Path) -> None:
    from velox.host.lora_presets import EXPERT_SIDES, REWARD_MODELS, reward_lora_file
    from velox.loaders.lora_formats import lora_state_dict, random_lora_factors

    shapes = {m: s for m, s in _expert_linear_shapes().items() if not REWARD_SKIP.search(f".{m}.")}
    for seed, (side, reward) in enumerate((s, r) for s in EXPERT_SIDES for r in REWARD_MODELS):
        factors = random_lora_factors(shapes, REWARD_RANK, REWARD_ALPHA, seed=100 + seed, scale=0.05)
        _write(models, f"loras/{reward_lora_file(side, reward)}", lora_state_dict(factors, "kohya_fun"))


def write_lightning_loras(models: Path) -> None:
    from velox.loaders.lora_formats import lora_state_dict, random_lora_factors

    for seed, (side, name) in enumerate(LIGHTNING_FILES.items()):
        factors = random_lora_factors(_expert_linear_shapes(), LIGHTNING_RANK, LIGHTNING_ALPHA, seed=200 + seed,
                                      scale=0.2)
        _write(models, name, lora_state_dict(factors, "official"))


LORA_WRITERS = {"wan 2.2 reward loras": write_reward_loras, "wan 2.2 lightning loras": write_lightning_loras}

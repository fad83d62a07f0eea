"""LoRA training on a Velox / core MODEL: trainable low-rank side modules, the family's objective, AdamW.

How the LoRA enters the model: a forward hook on each target Linear adds ``scale * up(down(x))`` to
its output, the same side product PEFT computes and ``host/lowrank.py`` uses at inference, so
1. the frozen base is never touched (bf16, FP8, INT8 or packed GGUF layers of ``host/quant_ops.py``
   alike: QLoRA needs nothing more than the base layer's own forward);
2. the gradient of a pair costs two thin GEMMs, never a dense ``up @ down`` per step (core's
   ``TrainLoraNode`` patches weights through ``weight_function``, which needs a dense weight).

Objectives, each the one its family's sampler assumes (``OBJECTIVES``):
- flow matching (Wan, Sana: rectified flow as core samples it): sigma = shift(u), u ~ U(lo, hi) where
  (lo, hi) covers all of [0, 1) or one Wan 2.2 expert's side of the boundary, ``shift`` the MODEL's own
  (``model_sampling.shift``); x_t = (1 - sigma) x0 + sigma noise; the network at timestep
  ``sigma * 1000`` predicts the velocity ``noise - x0``; loss = MSE.
- DDPM (VideoCrafter / DynamiCrafter, lvdm ``ddpm3d.LatentDiffusion.forward`` / ``p_losses``):
  t ~ randint(1000); x0 scaled by ``scale_arr[t]`` where the release trained so (``use_scale`` /
  ``use_dynamic_rescale``, the scaling ``sampling/videocrafter_ddim.py`` undoes); x_t = sqrt(a_t) x0 +
  sqrt(1 - a_t) noise on the release's schedule (zero terminal SNR for DynamiCrafter 512 / 1024); the
  target is ``noise`` (eps) or ``sqrt(a_t) noise - sqrt(1 - a_t) x0`` (v); loss = MSE. DynamiCrafter
  is conditioned as it trained: the clip's first latent frame on every frame (``c_concat``) and the
  CLIP-vision tokens of its first frame.
Wan 2.2's two experts train in one run (``train_lora_experts``): each draw's sigma picks the expert,
high noise while sigma >= boundary, the split ``sampling/wan_experts.py`` samples with.

Saved dialect: ``diffusion_model.<official module>.lora_down.weight`` (rank, in),
``.lora_up.weight`` (out, rank), ``.alpha`` (scalar): the Lightning / LightX2V layout that core's
``LoraLoaderModelOnly`` and ``VeloxLoraStack`` both load (scale alpha / rank, as PEFT's).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from ..loaders.lora_detect import FAMILY_NAMES, lora_family
from ..sampling.videocrafter_ddim import VideoDiffusionSchedule, alphas_cumprod, scale_array
from .kitchen_autograd import enable_kitchen_autograd

UNET_PREFIX = "diffusion_model."
TRAIN_TIMESTEPS = 1000
# module-name patterns (official names) per family and preset; VACE blocks train like main blocks
_WAN_ATTENTION = r"^(vace_)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)$"
_SANA_ATTENTION = (r"^blocks\.\d+\.attn\.(qkv|proj)$", r"^blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)$")
# lvdm: spatial and temporal transformers (init_attn included), text and image cross-attention
_UNET3D_BLOCK = r"^(input_blocks|middle_block|output_blocks|init_attn)\.(\d+\.)+transformer_blocks\.\d+\."
TARGET_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "wan": {
        "attention": (_WAN_ATTENTION,),
        "attention_ffn": (_WAN_ATTENTION, r"^(vace_)?blocks\.\d+\.ffn\.(0|2)$"),
    },
    # Sana's Mix-FFN is convolutional (1x1 / depthwise convs), which a Linear LoRA cannot wrap
    "sana": {"attention": _SANA_ATTENTION},
    # SANA-Video's blocks keep Sana's attention names (its Mix-FFN and temporal conv are convolutions too)
    "sana_video": {"attention": _SANA_ATTENTION},
    "videocrafter": {
        "attention": (_UNET3D_BLOCK + r"attn[12]\.(to_q|to_k|to_v|to_out\.0|to_k_ip|to_v_ip)$",),
        "attention_ffn": (_UNET3D_BLOCK + r"attn[12]\.(to_q|to_k|to_v|to_out\.0|to_k_ip|to_v_ip)$",
                          _UNET3D_BLOCK + r"ff\.net\.(0\.proj|2)$"),
    },
}
EXPERT_SIDES = ("all", "high_noise", "low_noise")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run (also written into the LoRA's header)."""

    rank: int = 16
    alpha: float = 16.0
    targets: str = "attention"
    learning_rate: float = 1e-4
    steps: int = 100
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    lora_dtype: str = "fp32"
    weight_decay: float = 0.01
    gradient_checkpointing: bool = False
    expert: str = "all"  # Wan 2.2: train one expert's side of the boundary
    boundary: float = 0.875


LORA_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# trainable low-rank pairs
# ----------------------------------------------------------------------------------------------


class LoraPair(torch.nn.Module):
    """One Linear's LoRA: down (rank, in), up (out, rank), scale alpha / rank. Up starts at zero,
    so the model starts as the base; down is PEFT's and core's kaiming-uniform (a = sqrt 5)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dtype: torch.dtype,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.down = torch.nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32))
        torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype; computed in the LoRA's dtype (PEFT does the same)."""
        side = torch.nn.functional.linear(torch.nn.functional.linear(x.to(self.down.dtype), self.down), self.up)
        return (side * (self.alpha / self.rank)).to(x.dtype)


def target_modules(diffusion_model: torch.nn.Module, family: str, preset: str) -> dict[str, torch.nn.Module]:
    """name -> module of every Linear-like layer (2-D weight or a quantized layer's in/out features)
    that the preset's patterns name, in module order."""
    presets = TARGET_PRESETS.get(family)
    if presets is None or preset not in presets:
        known = ", ".join(f"{f}: {'/'.join(p)}" for f, p in TARGET_PRESETS.items())
        raise ValueError(f"no LoRA target preset {preset!r} for family {family!r} (known: {known})")
    pattern = re.compile("|".join(presets[preset]))
    found = {name: module for name, module in diffusion_model.named_modules()
             if pattern.search(name) and _linear_shape(module) is not None}
    if not found:
        raise ValueError(f"the {preset} preset names no layer of this {FAMILY_NAMES.get(family, family)} model")
    return found


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear, core's cast Linear or a Velox quantized Linear; None for anything else."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.out_features), int(module.in_features)
    return None


class TrainableLora(torch.nn.Module):
    """The LoRA pairs of one model, keyed by official module name."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = list(shapes)
        # ModuleDict keys cannot hold dots
        self.pairs = torch.nn.ModuleDict({
            name.replace(".", "__"): LoraPair(shapes[name][1], shapes[name][0], rank, alpha, dtype, generator)
            for name in self.names})

    def pair(self, name: str) -> LoraPair:
        return self.pairs[name.replace(".", "__")]

    @contextmanager
    def attached(self, modules: Mapping[str, torch.nn.Module]) -> Iterator[None]:
        """Hooks that add each pair's side product to its layer's output, removed on exit."""
        handles = [modules[name].register_forward_hook(_side_hook(self.pair(name))) for name in self.names]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved dialect: ``diffusion_model.<module>.lora_down.weight / lora_up.weight / alpha``."""
        out = {}
        for name in self.names:
            pair, key = self.pair(name), UNET_PREFIX + name
            out[f"{key}.lora_down.weight"] = pair.down.detach().clone().contiguous()
            out[f"{key}.lora_up.weight"] = pair.up.detach().clone().contiguous()
            out[f"{key}.alpha"] = torch.tensor(pair.alpha, dtype=torch.float32)
        return out

    def load_lora_state_dict(self, tensors: Mapping[str, torch.Tensor], name: str, family: str) -> None:
        """Resume from a saved LoRA: same family, same modules, same rank (refused by name otherwise)."""
        found = lora_family(tensors.keys())
        if found != family:
            what = FAMILY_NAMES.get(found, "an unknown family") if found else "no known family"
            raise VeloxLoadError(name, f"is a LoRA of {what} but the model being trained is "
                                 f"{FAMILY_NAMES.get(family, family)}", f"a {FAMILY_NAMES.get(family, family)} LoRA "
                                 "saved by VeloxTrainLora with the same targets and rank")
        for module in self.names:
            pair, key = self.pair(module), UNET_PREFIX + module
            down, up = tensors.get(f"{key}.lora_down.weight"), tensors.get(f"{key}.lora_up.weight")
            if down is None or up is None or down.shape != pair.down.shape or up.shape != pair.up.shape:
                raise VeloxLoadError(name, f"has no {tuple(pair.down.shape)} / {tuple(pair.up.shape)} pair for "
                                     f"{module}", "a LoRA saved with the same targets and rank")
            with torch.no_grad():
                pair.down.copy_(down)
                pair.up.copy_(up)


def _side_hook(pair: LoraPair) -> Callable:
    def hook(module, args, output):
        return output + pair(args[0])
    return hook


# ----------------------------------------------------------------------------------------------
# the objectives: flow matching (Wan, Sana) and DDPM eps / v (VideoCrafter, DynamiCrafter)
# ----------------------------------------------------------------------------------------------


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Core's ``time_snr_shift``: shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: float, shift: float) -> float:
    """The inverse of ``shift_sigma``: the u whose shifted sigma is ``sigma``."""
    return sigma / (shift - (shift - 1) * sigma)


def uniform_range(expert: str, boundary: float, shift: float) -> tuple[float, float]:
    """The (lo, hi) of u for one Wan 2.2 expert: the high-noise expert sees sigma >= boundary."""
    if expert not in EXPERT_SIDES:
        raise ValueError(f"expert {expert!r} is not one of {', '.join(EXPERT_SIDES)}")
    cut = unshift_sigma(boundary, shift)
    return {"all": (0.0, 1.0), "high_noise": (cut, 1.0), "low_noise": (0.0, cut)}[expert]


@dataclass
class FlowBatch:
    """One micro-batch: latent x0 (B, C, T, H, W), context (B, L, D), noise like x0, sigma (B,);
    ``context_mask`` (B, L) 1 for real tokens, 0 for the padding of shorter captions."""

    latent: torch.Tensor
    context: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    context_mask: torch.Tensor | None = None

    def noisy(self) -> torch.Tensor:
        sigma = self.sigma.view(-1, *([1] * (self.latent.ndim - 1)))
        return (1 - sigma) * self.latent + sigma * self.noise

    def target(self) -> torch.Tensor:
        return self.noise - self.latent

    def timestep(self) -> torch.Tensor:
        return self.sigma * TRAIN_TIMESTEPS

    def conditions(self) -> dict:
        return {} if self.context_mask is None else {"context_mask": self.context_mask}

    def select(self, keep: torch.Tensor) -> FlowBatch:
        """The samples where ``keep`` (B,) bool is true."""
        mask = None if self.context_mask is None else self.context_mask[keep]
        return FlowBatch(self.latent[keep], self.context[keep], self.noise[keep], self.sigma[keep], mask)


@dataclass
class DiffusionBatch:
    """One DDPM micro-batch (lvdm): latent x0 (B, C, T, H, W), context (B, L, D), noise like x0,
    integer timesteps t (B,), and the release's schedule terms at t: sqrt(a_t), sqrt(1 - a_t), and the
    x0 scale s_t (1 without timestep scaling). ``extra`` holds the network's other inputs (fps,
    DynamiCrafter's ``concat`` latent and ``clip_vision_tokens``)."""

    latent: torch.Tensor
    context: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    sqrt_alpha: torch.Tensor
    sqrt_one_minus_alpha: torch.Tensor
    scale: torch.Tensor
    prediction: str
    extra: dict = field(default_factory=dict)

    def _view(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *([1] * (self.latent.ndim - 1)))

    def scaled_latent(self) -> torch.Tensor:
        return self._view(self.scale) * self.latent

    def noisy(self) -> torch.Tensor:
        return self._view(self.sqrt_alpha) * self.scaled_latent() + self._view(self.sqrt_one_minus_alpha) * self.noise

    def target(self) -> torch.Tensor:
        if self.prediction == "v":
            return self._view(self.sqrt_alpha) * self.noise - self._view(self.sqrt_one_minus_alpha) * self.scaled_latent()
        return self.noise

    def timestep(self) -> torch.Tensor:
        return self.t

    def conditions(self) -> dict:
        return self.extra


def objective_loss(predict: Callable, batch: FlowBatch | DiffusionBatch) -> torch.Tensor:
    """MSE between the network's prediction and the objective's target, in fp32.
    predict(x_t, timestep, context, **batch.conditions()) -> like x_t."""
    predicted = predict(batch.noisy(), batch.timestep(), batch.context, **batch.conditions())
    return torch.nn.functional.mse_loss(predicted.float(), batch.target().float())


flow_matching_loss = objective_loss  # the flow batch's target is the velocity noise - x0


def wan_velocity(diffusion_model: torch.nn.Module, dtype: torch.dtype) -> Callable:
    """Core's WanModel as velocity(x_t (B, C, T, H, W), timestep (B,), context (B, L, D))."""
    in_channels, out_channels = diffusion_model.patch_embedding.in_channels, diffusion_model.out_dim
    if in_channels != out_channels:  # I2V: noise + mask + image latent channels
        raise ValueError(f"this Wan model takes {in_channels} input channels for {out_channels} latent channels "
                         "(image-to-video: the noise, a mask and the start image's latent); VeloxTrainLora trains "
                         "text-to-video Wan (2.1 T2V, 2.2 T2V experts, VACE blocks) only")

    def velocity(x, timestep, context, **_unused):
        return diffusion_model(x.to(dtype), timestep, context.to(dtype))
    return velocity


def sana_velocity(diffusion_model: torch.nn.Module, dtype: torch.dtype) -> Callable:
    """Velox's SanaTransformer as velocity(x_t (B, C, T, H, W), timestep (B,), context (B, L, D)):
    an image model, so each frame is one image with its clip's caption and timestep."""
    if getattr(diffusion_model, "cfg_embedder", None) is not None or diffusion_model.timestep_norm_scale != 1.0:
        raise ValueError("this is a SANA-Sprint model (TrigFlow, guidance embedding), distilled with sCM, not "
                         "flow matching; VeloxTrainLora trains Sana / Sana 1.5 models")

    def velocity(x, timestep, context, context_mask=None):
        b, c, t, h, w = x.shape
        frames = x.movedim(2, 1).reshape(b * t, c, h, w).to(dtype)
        mask = None if context_mask is None else context_mask.repeat_interleave(t, 0)
        out = diffusion_model(frames, timestep.repeat_interleave(t), context.to(dtype).repeat_interleave(t, 0),
                              context_mask=mask)
        return out.reshape(b, t, c, h, w).movedim(1, 2)
    return velocity


def sana_video_velocity(diffusion_model: torch.nn.Module, dtype: torch.dtype) -> Callable:
    """Velox's SanaVideoTransformer as velocity(x_t (B, C, T, H, W), timestep (B,), context (B, L, D))."""
    def velocity(x, timestep, context, context_mask=None, **_unused):
        return diffusion_model(x.to(dtype), timestep, context.to(dtype), context_mask=context_mask)
    return velocity


def videocrafter_prediction(diffusion_model: torch.nn.Module, dtype: torch.dtype) -> Callable:
    """Velox's VideoCrafterUNet as predict(x_t (B, 4, T, H, W), t (B,) long, context (B, 77, D), fps,
    concat (B, 4, T, H, W) or None, clip_vision_tokens or None) -> eps or v."""
    def predict(x, timestep, context, fps=None, concat=None, clip_vision_tokens=None):
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        tokens = None if clip_vision_tokens is None else clip_vision_tokens.to(dtype)
        return diffusion_model(x.to(dtype), timestep, context.to(dtype), fps=fps, clip_vision_tokens=tokens)
    return predict


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One cached training example, on the CPU, in the model's latent space: latent (C, T, H, W), text
    context (L, D); ``image_tokens`` (N, D') the CLIP-vision tokens of its first frame (DynamiCrafter)
    and ``fps`` the rate its frames were sampled at (0: unknown)."""

    latent: torch.Tensor
    context: torch.Tensor
    name: str = ""
    image_tokens: torch.Tensor | None = None
    fps: float = 0.0


@dataclass(frozen=True)
class DiffusionObjective:
    """A VideoCrafter / DynamiCrafter release's training objective (``VideoCrafterVariant``)."""

    schedule: VideoDiffusionSchedule
    default_fps: int = 16
    concat_image: bool = False  # DynamiCrafter: the first latent frame on every frame
    image_tokens: bool = False  # I2V: the CLIP-vision tokens of the first frame

    @classmethod
    def of_variant(cls, variant) -> DiffusionObjective:
        return cls(variant.schedule, variant.preset.fps, variant.concat_image, variant.is_i2v)


class BatchDrawer:
    """Seeded draws of samples, noise and timesteps, on the CPU so a seed means the same run everywhere.

    ``objective`` is the flow shift (a float: Wan, Sana) or a ``DiffusionObjective`` (VideoCrafter)."""

    def __init__(self, samples: Sequence[Sample], config: TrainConfig, objective: float | DiffusionObjective,
                 device: torch.device):
        if not samples:
            raise ValueError("no training samples")
        self.samples, self.config, self.device = list(samples), config, device
        self.objective = objective
        if isinstance(objective, DiffusionObjective):
            self.alphas = torch.from_numpy(alphas_cumprod(objective.schedule)).float()
            end = objective.schedule.scale_end
            self.scales = torch.ones(TRAIN_TIMESTEPS) if end is None else torch.from_numpy(scale_array(end)).float()
        else:
            self.shift = float(objective)
            self.range = uniform_range(config.expert, config.boundary, self.shift)
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # seed itself went to the LoRA init

    def _pick(self) -> list[Sample]:
        picks = torch.randint(len(self.samples), (self.config.batch_size,), generator=self.generator).tolist()
        chosen = [self.samples[i] for i in picks]
        shapes = {tuple(s.latent.shape) for s in chosen}
        if len(shapes) > 1:
            raise ValueError(f"batch_size {self.config.batch_size} needs clips of one size; drew {sorted(shapes)} "
                             "(use batch_size 1 with mixed sizes)")
        return chosen

    def draw(self) -> FlowBatch | DiffusionBatch:
        chosen = self._pick()
        latent = torch.stack([s.latent.float() for s in chosen])
        context, mask = _stack_padded([s.context.float() for s in chosen])
        noise = torch.randn(latent.shape, generator=self.generator)
        if isinstance(self.objective, DiffusionObjective):
            return self._diffusion_batch(chosen, latent, context, noise)
        lo, hi = self.range
        u = lo + (hi - lo) * torch.rand(len(chosen), generator=self.generator)
        sigma = shift_sigma(u, self.shift)
        return FlowBatch(*(x.to(self.device) for x in (latent, context, noise, sigma)),
                         None if mask is None else mask.to(self.device))

    def _diffusion_batch(self, chosen, latent, context, noise) -> DiffusionBatch:
        objective = self.objective
        t = torch.randint(TRAIN_TIMESTEPS, (len(chosen),), generator=self.generator)
        alpha = self.alphas[t]
        extra = {"fps": torch.tensor([round(s.fps) or objective.default_fps for s in chosen])}
        if objective.concat_image:  # lvdm: img_cat_cond = z[:, :, 0] repeated over the frames
            extra["concat"] = latent[:, :, :1].expand_as(latent).contiguous()
        if objective.image_tokens:
            if any(s.image_tokens is None for s in chosen):
                raise ValueError("this image-to-video model trains on each clip's first frame as CLIP-vision "
                                 "tokens: connect the model's CLIP_VISION to the dataset node's clip_vision input")
            extra["clip_vision_tokens"] = torch.stack([s.image_tokens.float() for s in chosen])
        return DiffusionBatch(latent.to(self.device), context.to(self.device), noise.to(self.device),
                              t.to(self.device), alpha.sqrt().to(self.device), (1 - alpha).sqrt().to(self.device),
                              self.scales[t].to(self.device), objective.schedule.prediction,
                              {k: v.to(self.device) for k, v in extra.items()})


def _stack_padded(contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L_i, D) each -> (B, max L, D) zero padded, as Wan's official text context is, and the
    (B, max L) mask of real tokens (None when no caption was padded)."""
    length = max(c.shape[0] for c in contexts)
    stacked = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[0])) for c in contexts])
    if all(c.shape[0] == length for c in contexts):
        return stacked, None
    return stacked, torch.stack([(torch.arange(length) < c.shape[0]).float() for c in contexts])


def make_optimizer(lora: TrainableLora | Sequence[TrainableLora], config: TrainConfig) -> torch.optim.Optimizer:
    loras = [lora] if isinstance(lora, TrainableLora) else list(lora)
    params = [p for one in loras for p in one.parameters()]
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def training_step(predict: Callable, optimizer: torch.optim.Optimizer,
                  batches: Sequence[FlowBatch | DiffusionBatch]) -> float:
    """One optimizer step over ``len(batches)`` accumulated micro-batches; returns the mean loss."""
    enable_kitchen_autograd()  # core 0.8.0's Wan RoPE (once; a no-op after the first call)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        loss = objective_loss(predict, batch) / len(batches)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def expert_training_step(predict_high: Callable, predict_low: Callable, boundary: float,
                         optimizer: torch.optim.Optimizer, batches: Sequence[FlowBatch]) -> float:
    """One step of both Wan 2.2 experts: each sample goes to the expert its sigma belongs to (high noise
    while sigma >= boundary), its loss weighted by its share of the micro-batch, so the mean over a
    batch equals the single-model loss; an expert that drew nothing keeps its LoRA (no gradient)."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        high = batch.sigma >= boundary
        for predict, keep in ((predict_high, high), (predict_low, ~high)):
            if keep.any():
                share = float(keep.sum()) / len(keep)
                loss = objective_loss(predict, batch.select(keep)) * share / len(batches)
                loss.backward()
                total += float(loss.detach())
    optimizer.step()
    return total


@dataclass
class TrainResult:
    lora: TrainableLora
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    low_noise_lora: TrainableLora | None = None  # Wan 2.2: both experts in one run


@dataclass
class _Trainee:
    """One model being trained: its network, target layers, LoRA and prediction function."""

    model: torch.nn.Module
    modules: dict
    lora: TrainableLora
    predict: Callable


def _trainee(patcher, family: str, config: TrainConfig, device, resume) -> _Trainee:
    model = patcher.model.diffusion_model
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    modules = target_modules(model, family, config.targets)
    lora = TrainableLora({n: _linear_shape(m) for n, m in modules.items()}, config.rank, config.alpha,
                         LORA_DTYPES[config.lora_dtype], config.seed).to(device)
    if resume is not None:
        lora.load_lora_state_dict(resume[1], resume[0], family)
    _freeze(model)
    return _Trainee(model, modules, lora, PREDICTIONS[family](model, dtype))


PREDICTIONS: dict[str, Callable] = {"wan": wan_velocity, "sana": sana_velocity, "sana_video": sana_video_velocity,
                                    "videocrafter": videocrafter_prediction}


def training_objective(patcher, family: str) -> float | DiffusionObjective:
    """The flow shift the MODEL samples with (Wan, Sana, SANA-Video), or the release's DDPM objective (VideoCrafter)."""
    if family == "videocrafter":
        return DiffusionObjective.of_variant(patcher.model.model_config.velox_variant)
    return float(patcher.get_model_object("model_sampling").shift)


def train_lora(patcher, samples: Sequence[Sample], config: TrainConfig, family: str = "wan",
               resume: tuple[str, Mapping[str, torch.Tensor]] | None = None,
               on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a LoRA on ``patcher``'s diffusion model (left unchanged). ``on_step(step, loss)`` runs after
    every step. An interrupt (core's ``InterruptProcessingException``, from ``on_step`` or from core's
    ops mid-step) is re-raised as ``TrainingInterrupted`` carrying the LoRA of the last whole step."""
    import comfy.model_management

    enable_kitchen_autograd()
    with torch.inference_mode(False):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        device = comfy.model_management.get_torch_device()
        trainee = _trainee(patcher, family, config, device, resume)
        drawer = BatchDrawer(samples, config, training_objective(patcher, family), device)
        result = TrainResult(trainee.lora)
        optimizer = make_optimizer(trainee.lora, config)
        with trainee.lora.attached(trainee.modules), checkpointed_blocks(trainee.model,
                                                                         config.gradient_checkpointing):
            _run_steps(config, result, on_step,
                       lambda: training_step(trainee.predict, optimizer,
                                             [drawer.draw() for _ in range(config.grad_accumulation)]))
        return result


def train_lora_experts(high_noise, low_noise, samples: Sequence[Sample], config: TrainConfig,
                       resume: tuple[tuple[str, Mapping], tuple[str, Mapping]] | None = None,
                       on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Wan 2.2 A14B: one LoRA per expert in one run. Sigmas are drawn over the whole schedule (the
    shift of the high-noise MODEL, which both experts sample with) and each sample trains the expert
    that denoises it, split at ``config.boundary`` as the expert sampler switches. ``result.lora`` is
    the high-noise expert's, ``result.low_noise_lora`` the low-noise one's."""
    import comfy.model_management

    if config.expert != "all":
        raise ValueError(f"expert {config.expert!r}: with both experts given, each trains on its own side of "
                         "the boundary; set expert to 'all'")
    enable_kitchen_autograd()
    with torch.inference_mode(False):
        comfy.model_management.load_models_gpu([high_noise, low_noise], force_full_load=True)
        device = comfy.model_management.get_torch_device()
        high = _trainee(high_noise, "wan", config, device, None if resume is None else resume[0])
        low = _trainee(low_noise, "wan", config, device, None if resume is None else resume[1])
        drawer = BatchDrawer(samples, config, training_objective(high_noise, "wan"), device)
        result = TrainResult(high.lora, low_noise_lora=low.lora)
        optimizer = make_optimizer([high.lora, low.lora], config)
        with high.lora.attached(high.modules), low.lora.attached(low.modules), \
                checkpointed_blocks(high.model, config.gradient_checkpointing), \
                checkpointed_blocks(low.model, config.gradient_checkpointing):
            _run_steps(config, result, on_step,
                       lambda: expert_training_step(high.predict, low.predict, config.boundary, optimizer,
                                                    [drawer.draw() for _ in range(config.grad_accumulation)]))
        return result


def _run_steps(config: TrainConfig, result: TrainResult, on_step, step_fn: Callable[[], float]) -> None:
    import comfy.model_management

    try:
        for step in range(config.steps):
            result.losses.append(step_fn())
            if on_step is not None:
                on_step(step, result.losses[-1])
    # core's ops check the interrupt flag inside the forward pass too: the optimizer has not
    # stepped then, so the LoRA is the last whole step's
    except comfy.model_management.InterruptProcessingException as error:
        result.interrupted = True
        raise TrainingInterrupted(result) from error


def to_model_space(patcher, samples: Sequence[Sample]) -> list[Sample]:
    """Samples of raw VAE latents (what the dataset caches, as core's VAE.encode returns them) in the
    MODEL's latent space: ``process_latent_in``, which core's samplers apply to every latent."""
    latent_format = patcher.model.latent_format
    return [replace(s, latent=latent_format.process_in(s.latent[None].float())[0]) for s in samples]


class TrainingInterrupted(Exception):
    """A run stopped by its ``on_step`` callback; ``result`` holds the LoRA after the last whole step."""

    def __init__(self, result: TrainResult):
        super().__init__(f"training stopped after {len(result.losses)} step(s)")
        self.result = result


def _freeze(model: torch.nn.Module) -> None:
    """Frozen base; weights made under inference mode (a node's loader) become ordinary tensors,
    which autograd may save for the backward pass."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_inference():
                setattr(module, name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
            else:
                param.requires_grad_(False)


def _checkpoint_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks recomputed in the backward pass: a DiT's ``blocks``, a UNet's input, middle and
    output blocks."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    units = list(getattr(model, "input_blocks", []))
    middle = getattr(model, "middle_block", None)
    return units + ([middle] if middle is not None else []) + list(getattr(model, "output_blocks", []))


@contextmanager
def checkpointed_blocks(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Each transformer block recomputed in the backward pass (activation memory of one block)."""
    blocks = _checkpoint_units(model) if enabled else []
    originals = [block.forward for block in blocks]
    for block, forward in zip(blocks, originals):
        block.forward = _checkpointed(forward)
    try:
        yield
    finally:
        for block, forward in zip(blocks, originals):
            block.forward = forward


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def training_metadata(config: TrainConfig, family: str, losses: Sequence[float], extra: Mapping[str, str]) -> dict:
    """The safetensors header: strings only (the format's rule)."""
    metadata = {"velox.family": family, "velox.dialect": "diffusion_model.<module>.lora_down/lora_up/alpha",
                "velox.steps_done": str(len(losses)), "velox.config": json.dumps(asdict(config)),
                "velox.loss_last": f"{losses[-1]:.6g}" if losses else "", **extra}
    return {k: str(v) for k, v in metadata.items()}


def save_lora(path: str | Path, lora: TrainableLora, metadata: Mapping[str, str]) -> Path:
    """Write the LoRA atomically (a crash mid-write never leaves half a checkpoint under the name)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    save_file({k: v.cpu() for k, v in lora.lora_state_dict().items()}, str(partial), metadata=dict(metadata))
    partial.replace(path)
    return path

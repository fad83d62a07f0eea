"""LoRA training on a Velox / core MODEL: trainable low-rank side modules, the family's objective, AdamW.

How the LoRA enters the model: a forward hook on each target Linear adds ``scale * up(down(x))`` to
its output, the same side product PEFT computes and ``host/lowrank.py`` uses at inference, so
1. the frozen base is never touched (bf16, FP8, INT8 or packed GGUF layers of ``host/quant_ops.py``
   alike: QLoRA needs nothing more than the base layer's own forward);
2. the gradient of a pair costs two thin GEMMs, never a dense ``up @ down`` per step (core's
   ``TrainLoraNode`` patches weights through ``weight_function``, which needs a dense weight).

Objective (Wan, rectified flow as core samples it): sigma = shift(u), u ~ U(lo, hi) where (lo, hi)
covers all of [0, 1) or one Wan 2.2 expert's side of the boundary; x_t = (1 - sigma) x0 + sigma noise;
the transformer at timestep ``sigma * 1000`` predicts the velocity ``noise - x0``; loss = MSE.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from ..loaders.lora_detect import FAMILY_NAMES, lora_family

UNET_PREFIX = "diffusion_model."
TRAIN_TIMESTEPS = 1000
# module-name patterns (official names) per family and preset; VACE blocks train like main blocks
TARGET_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "wan": {
        "attention": (r"^(vace_)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)$",),
        "attention_ffn": (r"^(vace_)?blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)$",
                          r"^(vace_)?blocks\.\d+\.ffn\.(0|2)$"),
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
# the flow-matching objective
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
    """One micro-batch: latent x0 (B, C, T, H, W), context (B, L, D), noise like x0, sigma (B,)."""

    latent: torch.Tensor
    context: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor

    def noisy(self) -> torch.Tensor:
        sigma = self.sigma.view(-1, *([1] * (self.latent.ndim - 1)))
        return (1 - sigma) * self.latent + sigma * self.noise

    def target(self) -> torch.Tensor:
        return self.noise - self.latent

    def timestep(self) -> torch.Tensor:
        return self.sigma * TRAIN_TIMESTEPS


def flow_matching_loss(velocity: Callable, batch: FlowBatch) -> torch.Tensor:
    """MSE between the predicted and the true velocity, in fp32. velocity(x_t, t, context) -> like x_t."""
    predicted = velocity(batch.noisy(), batch.timestep(), batch.context)
    return torch.nn.functional.mse_loss(predicted.float(), batch.target().float())


def wan_velocity(diffusion_model: torch.nn.Module, dtype: torch.dtype) -> Callable:
    """Core's WanModel as velocity(x_t (B, C, T, H, W), timestep (B,), context (B, L, D))."""
    def velocity(x, timestep, context):
        return diffusion_model(x.to(dtype), timestep, context.to(dtype))
    return velocity


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One cached training example: latent (C, T, H, W) and text context (L, D), both on the CPU."""

    latent: torch.Tensor
    context: torch.Tensor
    name: str = ""


class BatchDrawer:
    """Seeded draws of samples, noise and sigmas, on the CPU so a seed means the same run everywhere."""

    def __init__(self, samples: Sequence[Sample], config: TrainConfig, shift: float, device: torch.device):
        if not samples:
            raise ValueError("no training samples")
        self.samples, self.config, self.device = list(samples), config, device
        self.range = uniform_range(config.expert, config.boundary, shift)
        self.shift = shift
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # seed itself went to the LoRA init

    def draw(self) -> FlowBatch:
        picks = torch.randint(len(self.samples), (self.config.batch_size,), generator=self.generator).tolist()
        chosen = [self.samples[i] for i in picks]
        shapes = {tuple(s.latent.shape) for s in chosen}
        if len(shapes) > 1:
            raise ValueError(f"batch_size {self.config.batch_size} needs clips of one size; drew {sorted(shapes)} "
                             "(use batch_size 1 with mixed sizes)")
        latent = torch.stack([s.latent.float() for s in chosen])
        context = _stack_padded([s.context.float() for s in chosen])
        noise = torch.randn(latent.shape, generator=self.generator)
        lo, hi = self.range
        u = lo + (hi - lo) * torch.rand(len(chosen), generator=self.generator)
        sigma = shift_sigma(u, self.shift)
        return FlowBatch(*(t.to(self.device) for t in (latent, context, noise, sigma)))


def _stack_padded(contexts: list[torch.Tensor]) -> torch.Tensor:
    """(L_i, D) each -> (B, max L, D), zero padded as Wan's official text context is."""
    length = max(c.shape[0] for c in contexts)
    return torch.stack([torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[0])) for c in contexts])


def make_optimizer(lora: TrainableLora, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(lora.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def training_step(velocity: Callable, optimizer: torch.optim.Optimizer, batches: Sequence[FlowBatch]) -> float:
    """One optimizer step over ``len(batches)`` accumulated micro-batches; returns the mean loss."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        loss = flow_matching_loss(velocity, batch) / len(batches)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


@dataclass
class TrainResult:
    lora: TrainableLora
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False


def train_lora(patcher, samples: Sequence[Sample], config: TrainConfig, family: str = "wan",
               resume: tuple[str, Mapping[str, torch.Tensor]] | None = None,
               on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a LoRA on ``patcher``'s diffusion model (left unchanged). ``on_step(step, loss)`` runs after
    every step. An interrupt (core's ``InterruptProcessingException``, from ``on_step`` or from core's
    ops mid-step) is re-raised as ``TrainingInterrupted`` carrying the LoRA of the last whole step."""
    import comfy.model_management

    with torch.inference_mode(False):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        model = patcher.model.diffusion_model
        device = comfy.model_management.get_torch_device()
        dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
        modules = target_modules(model, family, config.targets)
        lora = TrainableLora({n: _linear_shape(m) for n, m in modules.items()}, config.rank, config.alpha,
                             LORA_DTYPES[config.lora_dtype], config.seed).to(device)
        if resume is not None:
            lora.load_lora_state_dict(resume[1], resume[0], family)
        shift = float(patcher.get_model_object("model_sampling").shift)
        drawer = BatchDrawer(samples, config, shift, device)
        result = TrainResult(lora)
        _freeze(model)
        optimizer = make_optimizer(lora, config)
        with lora.attached(modules), checkpointed_blocks(model, config.gradient_checkpointing):
            velocity = wan_velocity(model, dtype)
            try:
                for step in range(config.steps):
                    batches = [drawer.draw() for _ in range(config.grad_accumulation)]
                    result.losses.append(training_step(velocity, optimizer, batches))
                    if on_step is not None:
                        on_step(step, result.losses[-1])
            # core's ops check the interrupt flag inside the forward pass too: the optimizer has not
            # stepped then, so the LoRA is the last whole step's
            except comfy.model_management.InterruptProcessingException as error:
                result.interrupted = True
                raise TrainingInterrupted(result) from error
        return result


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


@contextmanager
def checkpointed_blocks(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Each transformer block recomputed in the backward pass (activation memory of one block)."""
    blocks = list(getattr(model, "blocks", [])) if enabled else []
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

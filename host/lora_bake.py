"""Bake a weighted stack of LoRAs into one LoRA file: the summed delta per layer, truncated by SVD.

Per target weight W (out x in) the stack's delta is ``sum_i s_i * alpha_i / r_i * U_i D_i`` plus any
dense deltas (LoHa, LoKr, full diffs, computed by core's adapters on a zero weight). Low-rank-only
layers never form the dense matrix: with ``U = [c_i U_i]`` (out x R) and ``D = [D_i]`` (R x in),
``U = Q_u R_u``, ``D^T = Q_d R_d`` and the SVD of the small ``R_u R_d^T`` (R x R) give the exact
singular values of the delta, so a 4 x rank-128 stack on Wan-14B bakes in seconds. The kept
``rank`` singular triplets become ``lora_up = Q_u A sqrt(S)``, ``lora_down = sqrt(S) B^T Q_d^T``
(official ``diffusion_model.*`` names, ``alpha = rank``, so the file applies at strength 1).
Bias diffs and non-matrix deltas (modulation tables, conv kernels) are stored exactly as ``diff``.

The error reported is the Frobenius norm of what truncation drops, relative to the delta's norm:
overall (all layers) and the worst layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import comfy.lora
import comfy.weight_adapter as weight_adapter
import torch

from ..loaders.lora_keys import LoraTarget, resolve_lora_keys
from .lora_stack import (
    UNET_PREFIX,
    ModelLoraContext,
    StackItem,
    check_adapter,
    check_family,
    matches_nothing,
    read_lora,
)


@dataclass
class LayerDelta:
    """The stack's contributions to one weight: scaled low-rank factors and a dense remainder (fp32)."""

    shape: tuple[int, ...]
    ups: list[torch.Tensor] = field(default_factory=list)  # (out, r_i), scale folded in
    downs: list[torch.Tensor] = field(default_factory=list)  # (r_i, in)
    dense: torch.Tensor | None = None

    def add_dense(self, delta: torch.Tensor) -> None:
        self.dense = delta if self.dense is None else self.dense + delta


@dataclass
class BakeReport:
    rank: int
    layers: int = 0
    exact_layers: int = 0
    dense_diffs: int = 0
    dropped_sq: float = 0.0
    total_sq: float = 0.0
    worst: tuple[float, str] = (0.0, "")
    unmatched: dict[str, list[str]] = field(default_factory=dict)

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.dropped_sq / self.total_sq) if self.total_sq > 0 else 0.0

    def text(self, file_name: str, items: Sequence[StackItem], strengths: Sequence[float]) -> str:
        lines = [f"baked {len(items)} LoRA(s) into {file_name}: {self.layers} layer(s) at rank <= {self.rank}, "
                 f"{self.dense_diffs} exact diff(s)"]
        lines += [f"  {item.label} @ {s:g}" for item, s in zip(items, strengths)]
        lines.append(f"SVD approximation error (relative Frobenius norm of the dropped part): overall "
                     f"{self.relative_error:.3e}, worst layer {self.worst[0]:.3e} ({self.worst[1] or '-'}); "
                     f"{self.exact_layers} layer(s) exact (stack rank <= {self.rank})")
        for name, keys in self.unmatched.items():
            lines.append(f"WARNING {name}: {len(keys)} key(s) matched no module and were not baked: {keys[:4]}")
        return "\n".join(lines)


def _low_rank_parts(adapter, strength: float, target_shape: tuple[int, ...], offset):
    """(up (out, r) with scale and offset applied, down (r, in)) of a plain 2-D LoRA pair; else None."""
    if not isinstance(adapter, weight_adapter.LoRAAdapter) or len(target_shape) != 2:
        return None
    up, down, alpha, mid, dora, reshape = adapter.weights
    if mid is not None or dora is not None or reshape is not None:
        return None
    up, down = up.float().flatten(1), down.float().flatten(1)
    scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
    up = up * scale
    if offset is not None:  # a slice of a fused weight: pad the factor that spans the sliced dim
        dim, start, length = offset
        if dim == 0:
            up = torch.nn.functional.pad(up, (0, 0, start, target_shape[0] - start - length))
        else:
            down = torch.nn.functional.pad(down, (start, target_shape[1] - start - length))
    return up, down


def collect_deltas(patcher, items: Sequence[StackItem], strengths: Sequence[float], report: BakeReport,
                   device: torch.device | None = None) -> dict[str, LayerDelta]:
    """weight key -> its LayerDelta, over every LoRA of the stack (strength 0 skipped)."""
    context = ModelLoraContext(patcher)
    layers: dict[str, LayerDelta] = {}
    for item, strength in zip(items, strengths):
        if strength == 0:
            continue
        lora = read_lora(item.path)
        check_family(lora, context, item.label)
        resolved = resolve_lora_keys(lora, context.aliases)
        if resolved.unmatched:
            report.unmatched[item.label] = sorted(resolved.unmatched)
        patches = comfy.lora.load_lora(resolved.tensors, resolved.core_key_map(), log_missing=False)
        if not patches:  # text-encoder keys included: a bake keeps only the diffusion model's layers
            raise matches_nothing(item.label, lora, context.family)
        for core_key, adapter in patches.items():
            key, offset = (core_key, None) if isinstance(core_key, str) else (core_key[0], core_key[1])
            shape = context.weight_shape(key)
            check_adapter(item.label, LoraTarget(key, offset), adapter, shape)
            layer = layers.setdefault(key, LayerDelta(shape))
            parts = _low_rank_parts(adapter, strength, shape, offset)
            if parts is not None:
                layer.ups.append(parts[0].to(device))
                layer.downs.append(parts[1].to(device))
            else:
                zero = torch.zeros(shape, dtype=torch.float32, device=device)
                layer.add_dense(comfy.lora.calculate_weight([(strength, adapter, 1.0, offset, None)], zero, key))
    return layers


def truncate(layer: LayerDelta, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up (out, k), down (k, in), dropped squared norm, total squared norm), k <= rank."""
    if layer.dense is None:
        up, down = torch.cat(layer.ups, dim=1), torch.cat(layer.downs, dim=0)
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        a, s, bt = torch.linalg.svd(r_up @ r_down.T)
        a, bt = q_up @ a, bt @ q_down.T
    else:
        dense = layer.dense + sum((u @ d for u, d in zip(layer.ups, layer.downs)), torch.zeros_like(layer.dense))
        a, s, bt = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, int(s.shape[0]))
    root = s[:k].sqrt()
    dropped = float((s[k:].double() ** 2).sum())
    return a[:, :k] * root, root[:, None] * bt[:k], dropped, float((s.double() ** 2).sum())


def bake_lora_stack(patcher, items: Sequence[StackItem], strengths: Sequence[float], rank: int,
                    save_dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], BakeReport]:
    """The baked LoRA's tensors (official names) and the report, for ``items`` at ``strengths``."""
    if rank < 1:
        raise ValueError(f"VeloxLoraBake: rank must be at least 1, got {rank}")
    report = BakeReport(rank)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in collect_deltas(patcher, items, strengths, report, device).items():
        module = key[len(UNET_PREFIX):]
        if len(layer.shape) != 2 or not key.endswith(".weight"):  # biases, modulation tables, convs: exact
            delta = layer.dense if layer.dense is not None else sum(u @ d for u, d in zip(layer.ups, layer.downs))
            if key.endswith(".bias"):
                name = module.removesuffix(".bias") + ".diff_b"
            else:
                name = module.removesuffix(".weight") + ".diff"
            tensors[UNET_PREFIX + name] = delta.reshape(layer.shape).to("cpu", save_dtype)
            report.dense_diffs += 1
            continue
        up, down, dropped, total = truncate(layer, rank)
        module = module.removesuffix(".weight")
        tensors[f"{UNET_PREFIX}{module}.lora_up.weight"] = up.to("cpu", save_dtype).contiguous()
        tensors[f"{UNET_PREFIX}{module}.lora_down.weight"] = down.to("cpu", save_dtype).contiguous()
        tensors[f"{UNET_PREFIX}{module}.alpha"] = torch.tensor(float(up.shape[1]))
        report.layers += 1
        report.dropped_sq += dropped
        report.total_sq += total
        report.exact_layers += dropped == 0.0
        relative = math.sqrt(dropped / total) if total > 0 else 0.0
        if relative > report.worst[0]:
            report.worst = (relative, module)
    return tensors, report


def bake_metadata(items: Sequence[StackItem], strengths: Sequence[float], rank: int) -> dict[str, str]:
    stack = [{"lora": item.label, "strength": s} for item, s in zip(items, strengths)]
    return {"velox_bake": json.dumps({"rank": rank, "stack": stack})}

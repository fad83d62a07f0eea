"""Carry out a Wan expert residency plan (``sampling/wan_residency.py``) through core's own APIs.

- Pinned host copies: an expert's CPU weights are pinned in place (core's ``pin_memory``: page-locked, no
  second copy) and kept referenced while it is on the GPU. Putting it away re-points each GPU weight to
  its host tensor (``set_attr_param``) before core's ``model_unload``, so core's ``model.to(offload_device)``
  finds nothing to copy: no re-allocation of pageable memory, no expert copied twice.
- Streaming: a ``PREPARE_SAMPLING`` wrapper loads only ``weight_budget`` bytes of the expert (core's
  partial loading); the rest is cast per layer from the pinned host copy.
Core's own evictions (another model needing the card) still take core's path.
"""

from __future__ import annotations

import weakref

import comfy.model_management as mm
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.utils
import torch

from ..sampling.wan_residency import STREAMED, ResidencyPlan, plan_residency

# The VAE decode of 480p x 81 frames peaks near 4.2 GiB through the module (issue 15); round up.
VAE_RESERVE_BYTES = 6 * 1024 ** 3
GB = 1e9
_HOST_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # BaseModel -> {key: host tensor}
WRAPPER_KEY = "velox_wan_residency"


def card_memory(device, experts) -> int:
    """Free memory on ``device`` plus what the experts already hold there (theirs to reuse)."""
    if mm.is_device_cpu(device):
        return 1 << 62  # nothing moves on the CPU: everything is "resident"
    held = sum(loaded.model_loaded_memory() for loaded in mm.current_loaded_models
               if loaded.model is not None and any(loaded.model.is_clone(e) for e in experts))
    return mm.get_free_memory(device) + held


def headroom_bytes(patcher, latent_shape) -> int:
    """Activations of one cond + uncond forward (core's own estimate), core's inference reserve, the VAE."""
    shape = [latent_shape[0] * 2, *latent_shape[1:]]
    return int(patcher.memory_required(shape)) + int(mm.minimum_inference_memory()) + VAE_RESERVE_BYTES


def expert_plan(experts: dict, latent_shape, cap_gb: float = 0.0) -> ResidencyPlan:
    """The plan for ``{"high": patcher, "low": patcher}`` (one entry for a single model)."""
    first = next(iter(experts.values()))
    free = card_memory(first.load_device, list(experts.values()))
    sizes = {name: patcher.model_size() for name, patcher in experts.items()}
    cap = int(cap_gb * GB) if cap_gb else None
    return plan_residency(free, sizes, headroom_bytes(first, latent_shape), cap)


def keep_host_copy(patcher) -> None:
    """Hold (and pin in place) the expert's host weights, once; only while they are still on the host."""
    model = patcher.model
    if model in _HOST_COPIES:
        return
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    if any(not mm.is_device_cpu(t.device) for t in tensors.values()):
        return  # already on the GPU: core's unload makes the host tensors, taken on the next run
    pinned = [t for t in tensors.values() if mm.pin_memory(t)]
    _HOST_COPIES[model] = tensors
    weakref.finalize(model, _unpin, pinned)


def _unpin(tensors) -> None:
    for tensor in tensors:
        mm.unpin_memory(tensor)


def restore_host_copy(patcher) -> int:
    """Point every GPU weight of the expert back to its host tensor; returns how many. Weights core patched
    (LoRA) are left to core, whose backup is that same host tensor."""
    model, restored = patcher.model, 0
    for key, host in _HOST_COPIES.get(model, {}).items():
        current = comfy.utils.get_attr(model, key)
        if current is host or current.device == host.device or key in patcher.backup:
            continue
        setter = comfy.utils.set_attr_param if isinstance(host, torch.nn.Parameter) else comfy.utils.set_attr
        setter(model, key, host)
        restored += 1
    return restored


def put_away(expert) -> None:
    """Take every loaded clone of ``expert`` off the GPU: free with a host copy, core's copy without."""
    loaded_models = mm.current_loaded_models
    for i in range(len(loaded_models) - 1, -1, -1):
        patcher = loaded_models[i].model
        if patcher is not None and patcher.is_clone(expert):
            restore_host_copy(patcher)
            if loaded_models[i].model_unload():
                loaded_models.pop(i)
    mm.soft_empty_cache()


def _load_partially(patcher, weight_budget: int) -> None:
    """Core's ``load_models_gpu`` for one model, but with ``weight_budget`` bytes of weights at most."""
    loaded_models = mm.current_loaded_models
    if any(loaded.model is patcher for loaded in loaded_models):
        return
    for i in range(len(loaded_models) - 1, -1, -1):  # as core: a clone hands its loaded weights over
        other = loaded_models[i]
        if other.model is not None and other.model.is_clone(patcher):
            loaded_models.pop(i).model.detach(unpatch_all=False)
            other.model_finalizer.detach()
    mm.free_memory(weight_budget + mm.minimum_inference_memory(), patcher.load_device)
    loaded = mm.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=max(1, weight_budget - patcher.loaded_size()))
    loaded_models.insert(0, loaded)


def _streaming_prepare_sampling(weight_budget: int):
    def prepare(executor, model, noise_shape, conds, model_options=None, **kwargs):
        helpers = comfy.sampler_helpers
        models, inference_memory = helpers.get_additional_models(conds, model.model_dtype())
        models += helpers.get_additional_models_from_model_options(model_options)
        models += model.get_nested_additional_models()
        _load_partially(model, weight_budget)
        if models:
            mm.load_models_gpu(models, memory_required=inference_memory)
        return model.model, conds, models

    return prepare


def prepared_expert(patcher, plan: ResidencyPlan):
    """The expert as the plan runs it: with its host copy kept, and streamed within the weight budget."""
    if plan.host_copies:
        keep_host_copy(patcher)
    if plan.plan != STREAMED:
        return patcher
    patcher = patcher.clone()
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY,
                                 _streaming_prepare_sampling(plan.weight_budget))
    return patcher

"""LoRA training speed and memory on the GPU (issue #19, acceptance 4).

- ``wan1.3b``: Wan 2.1 1.3B at 480x832, 33 frames (9 latent frames, 14 040 tokens), rank 32 on attention + FFN,
  batch 1, bf16 base, fp32 LoRA, AdamW. Ours (core's WanModel, Velox's ``TrainableLora`` and
  ``training_step``, as ``VeloxTrainLora`` runs them) against diffusers' ``WanTransformer3DModel`` + PEFT
  ``LoraConfig`` on the same weights, batches and optimizer, in the same process. Target: ours >= 1.0x
  diffusers' steps/s.
- ``wan14b_fp8`` / ``wan14b_q4_k``: Wan 14B with an FP8 (per-channel, dequant compute) or GGUF Q4_K base kept
  packed, gradient checkpointing on: peak allocated VRAM of a training step at 480p / 33 frames (target
  <= 24 GB) and its steps/s. Ours only (diffusers + PEFT has no packed-FP8 / GGUF base to train on).

Weights are random at the real shapes, made on the GPU. One JSON line per measurement.

    python bench/bench_lora_training.py [--cases wan1.3b wan14b_fp8 wan14b_q4_k] [--steps 5]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from bench_wan_quant import WAN_14B, build, random_state_dict
from common import boot_comfy, emit, register_pack

WAN_1_3B = dict(WAN_14B, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
LATENT_33_FRAMES = (16, 9, 60, 104)  # 33 frames -> 9 latent frames, 480x832 / 8
TEXT_TOKENS, TEXT_DIM = 512, 4096
RANK, TARGETS = 32, "attention_ffn"
CASES = ("wan1.3b", "wan14b_fp8", "wan14b_q4_k")
QUANTIZED_14B = {"wan14b_fp8": "fp8_dequant", "wan14b_q4_k": "q4_k"}


def train_config(checkpointing: bool):
    from velox.host.lora_training import TrainConfig

    return TrainConfig(rank=RANK, alpha=RANK, targets=TARGETS, learning_rate=1e-4, batch_size=1, seed=0,
                       gradient_checkpointing=checkpointing)


def batches(count: int, device: torch.device) -> list:
    """``count`` seeded flow batches (shift 5, Wan's), drawn on the CPU and moved like the node's."""
    from velox.host.lora_training import BatchDrawer, Sample

    g = torch.Generator().manual_seed(3)
    sample = Sample(torch.randn(LATENT_33_FRAMES, generator=g), torch.randn(TEXT_TOKENS, TEXT_DIM, generator=g))
    drawer = BatchDrawer([sample], train_config(False), 5.0, device)
    return [drawer.draw() for _ in range(count)]


def steps_per_second(step, work: list, warmup: int = 2) -> tuple[float, list[float]]:
    """Steps/s over ``work`` after ``warmup`` steps (wall clock, synchronised), and every loss."""
    losses = [step(batch) for batch in work[:warmup]]
    torch.cuda.synchronize()
    start = time.perf_counter()
    losses += [step(batch) for batch in work[warmup:]]
    torch.cuda.synchronize()
    return (len(work) - warmup) / (time.perf_counter() - start), losses


def first_lora(model: torch.nn.Module, config):
    """The target layers of ``model`` and a fresh, seeded LoRA on them (up = 0, as a run starts)."""
    from velox.host.lora_training import TrainableLora, target_modules

    modules = target_modules(model, "wan", config.targets)
    lora = TrainableLora({n: (m.out_features, m.in_features) for n, m in modules.items()}, config.rank,
                         config.alpha, torch.float32, config.seed)
    return modules, lora.cuda()


def ours(model: torch.nn.Module, modules: dict, lora, config, work: list) -> tuple[float, list[float]]:
    """Velox's LoRA training loop on a core WanModel: the ``VeloxTrainLora`` step, minus file I/O."""
    from velox.host.lora_training import checkpointed_blocks, make_optimizer, training_step, wan_velocity

    model.requires_grad_(False)
    optimizer = make_optimizer(lora, config)
    predict = wan_velocity(model, torch.bfloat16)
    with lora.attached(modules), checkpointed_blocks(model, config.gradient_checkpointing):
        return steps_per_second(lambda batch: training_step(predict, optimizer, [batch]), work)


def diffusers_peft(state: dict[str, torch.Tensor], config, work: list, initial: dict) -> tuple[float, list[float]]:
    """diffusers' WanTransformer3DModel + PEFT LoRA (fp32 adapters, PEFT's default on a bf16 base),
    initialised from our LoRA's first weights, AdamW on its adapters."""
    import diffusers
    import peft
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from velox.host.lora_training import training_step
    from velox.loaders.wan_keys import official_to_diffusers_key
    from velox.tiny.wan import TinyWanConfig

    shape = TinyWanConfig("wan_1.3b", dim=WAN_1_3B["dim"], ffn_dim=WAN_1_3B["ffn_dim"],
                          num_layers=WAN_1_3B["num_layers"], text_dim=TEXT_DIM)
    kwargs = {k: v for k, v in shape.diffusers_config().items() if not k.startswith("_")}
    with torch.device("cuda"):
        model = diffusers.WanTransformer3DModel(**kwargs).to(torch.bfloat16)
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(state)), strict=True)
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=bf16) keeps them
        if set(name.split(".")) & set(model._keep_in_fp32_modules):
            module.float()
    model.requires_grad_(False)
    names = {n: official_to_diffusers_key(n + ".weight").removesuffix(".weight") for n in initial}
    lora_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                  target_modules=sorted(names.values()))
    model = peft.inject_adapter_in_model(lora_config, model)
    layers = dict(model.named_modules())
    params = []
    for official, name in names.items():
        a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        with torch.no_grad():
            a.data, b.data = initial[official][0].detach().clone(), initial[official][1].detach().clone()
        params += [a.requires_grad_(True), b.requires_grad_(True)]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def velocity(x, t, context, **_unused):
        return model(hidden_states=x.to(torch.bfloat16), timestep=t, encoder_hidden_states=context.to(torch.bfloat16),
                     return_dict=False)[0]
    return steps_per_second(lambda batch: training_step(velocity, optimizer, [batch]), work)


def core_wan(state: dict[str, torch.Tensor], config: dict) -> torch.nn.Module:
    import comfy.ldm.wan.model
    import comfy.ops

    model = comfy.ldm.wan.model.WanModel(**config, device="cuda", dtype=torch.bfloat16,
                                         operations=comfy.ops.disable_weight_init)
    model.load_state_dict(state, strict=True)
    return model


def run_1_3b(steps: int) -> None:
    state = random_state_dict(WAN_1_3B)
    config = train_config(checkpointing=False)
    work = batches(steps + 2, torch.device("cuda"))
    model = core_wan(state, WAN_1_3B)
    modules, lora = first_lora(model, config)
    initial = {n: (lora.pair(n).down.detach().clone(), lora.pair(n).up.detach().clone()) for n in modules}
    torch.cuda.reset_peak_memory_stats()
    rate, losses = ours(model, modules, lora, config, work)
    peak = torch.cuda.max_memory_allocated() / 1e9
    del model, modules, lora
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    want_rate, want_losses = diffusers_peft(state, config, work, initial)
    want_peak = torch.cuda.max_memory_allocated() / 1e9
    emit({"bench": "lora_training", "case": "wan1.3b", "tokens": 14040, "rank": RANK, "targets": TARGETS,
          "steps_per_s": round(rate, 3), "diffusers_peft_steps_per_s": round(want_rate, 3),
          "speedup_vs_diffusers_peft": round(rate / want_rate, 3), "peak_gb": round(peak, 2),
          "diffusers_peak_gb": round(want_peak, 2), "first_losses": [round(x, 4) for x in losses[:3]],
          "diffusers_first_losses": [round(x, 4) for x in want_losses[:3]], "device": torch.cuda.get_device_name()})


def run_14b(case: str, steps: int) -> None:
    model = build(QUANTIZED_14B[case], random_state_dict())
    gc.collect()
    torch.cuda.empty_cache()
    weights_gb = torch.cuda.memory_allocated() / 1e9
    config = train_config(checkpointing=True)
    modules, lora = first_lora(model, config)
    torch.cuda.reset_peak_memory_stats()
    rate, losses = ours(model, modules, lora, config, batches(steps + 2, torch.device("cuda")))
    emit({"bench": "lora_training", "case": case, "tokens": 14040, "rank": RANK, "targets": TARGETS,
          "gradient_checkpointing": True, "steps_per_s": round(rate, 4), "weights_gb": round(weights_gb, 2),
          "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "target_gb": 24,
          "losses": [round(x, 4) for x in losses], "device": torch.cuda.get_device_name()})
    del model, modules, lora
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    args = parser.parse_args()
    boot_comfy()
    register_pack()
    for case in args.cases:
        run_1_3b(args.steps) if case == "wan1.3b" else run_14b(case, args.steps)


if __name__ == "__main__":
    main()

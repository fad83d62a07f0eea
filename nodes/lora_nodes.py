"""LoRA nodes: a stack for any Velox / core model, per-expert stacks for Wan 2.2 A14B, the Wan2.2-Fun
reward-LoRA presets and blends, and a bake of a blended stack into one LoRA file.

Glue only: ``host.lora_stack`` applies LoRAs (core's patches on bf16 / fp16 weights, low-rank side
products on quantized layers), ``host.lora_presets`` holds the presets and warnings,
``host.lora_bake`` the SVD bake. Stacks travel on the ``VELOX_LORA_STACK`` wire (a list of
``StackEntry``), so reward presets feed a stack node and a stack feeds the bake.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..host.lora_presets import (
    DEFAULT_MPS_WEIGHT,
    DEFAULT_REWARD_STRENGTH,
    REWARD_PRESETS,
    StackEntry,
    expert_warnings,
    reward_preset_entries,
)
from .queue_validation import VeloxNode

CATEGORY = "Velox/LoRA"
SLOTS = 4
NONE = "None"
LoraStack = io.Custom("VELOX_LORA_STACK")
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STRENGTH = dict(default=1.0, min=-100.0, max=100.0, step=0.01)


def lora_choices() -> list[str]:
    import folder_paths

    return [NONE, *folder_paths.get_filename_list("loras")]


def _stack_input(single_model: bool = False) -> io.Input:
    note = " On a single model an expert stack's high-noise strengths apply." if single_model else ""
    return LoraStack.Input("lora_stack", optional=True,
                           tooltip="Optional: LoRAs from another stack or the reward presets, applied first." + note)


def _entries(stack, slots: list[StackEntry]) -> list[StackEntry]:
    return [*(stack or []), *(entry for entry in slots if entry.lora_name != NONE)]


def _apply(model, clip, entries: list[StackEntry], side: str, title: str):
    from ..host.lora_stack import StackItem, apply_lora_stack, lora_path, stack_report

    items = []
    for entry in entries:
        strength = entry.strength_high if side == "high" else entry.strength_low
        items.append(StackItem(lora_path(entry.lora_name), strength, strength if clip is not None else 0.0,
                               entry.lora_name))
    model, clip, reports = apply_lora_stack(model, clip, items)
    return model, clip, stack_report(title, reports)


def _with_warnings(text: str, warnings: list[str]) -> str:
    for warning in warnings:
        logging.warning("Velox LoRA: %s", warning)
    return "\n".join([text, *(f"WARNING: {w}" for w in warnings)])


class VeloxLoraStack(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slots = []
        for i in range(1, SLOTS + 1):
            slots += [io.Combo.Input(f"lora_{i}", options=lora_choices(), default=NONE,
                                     tooltip=f"LoRA {i} from models/loras ('None' skips the slot)."),
                      io.Float.Input(f"strength_{i}", **STRENGTH,
                                     tooltip=f"Strength of LoRA {i}, on the model and (if connected) the CLIP.")]
        return io.Schema(
            node_id="VeloxLoraStack",
            display_name="LoRA Stack (Velox)",
            category=CATEGORY,
            description="Applies up to four LoRAs (plus an incoming stack) in order to a MODEL, and to a CLIP "
            "where a file has text-encoder keys. Any key format (kohya, VideoX-Fun, diffusers/peft, official, "
            "LoHa/LoKr, diffs), alpha honoured; the same result as chained core LoraLoaderModelOnly nodes on "
            "bf16/fp16 models; quantized layers keep the LoRAs unmerged. Keys that match nothing are listed in "
            "the report.",
            inputs=[io.Model.Input("model", tooltip="The model the LoRAs modify (Wan, Sana or VideoCrafter)."),
                    *slots,
                    io.Clip.Input("clip", optional=True, tooltip="Optional text encoder for LoRAs with "
                                  "text-encoder keys."),
                    _stack_input(single_model=True)],
            outputs=[io.Model.Output(), io.Clip.Output(), LoraStack.Output(display_name="lora_stack"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, lora_1, strength_1, lora_2, strength_2, lora_3, strength_3, lora_4, strength_4,
                clip=None, lora_stack=None) -> io.NodeOutput:
        slots = [StackEntry(n, s, s) for n, s in
                 [(lora_1, strength_1), (lora_2, strength_2), (lora_3, strength_3), (lora_4, strength_4)]]
        entries = _entries(lora_stack, slots)
        model, clip, text = _apply(model, clip, entries, "high", "model")
        return io.NodeOutput(model, clip, entries, text, ui=ui.PreviewText(text))


class VeloxWanExpertLoraStack(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slots = []
        for i in range(1, SLOTS + 1):
            slots += [io.Combo.Input(f"lora_{i}", options=lora_choices(), default=NONE,
                                     tooltip=f"LoRA {i} from models/loras ('None' skips the slot)."),
                      io.Float.Input(f"strength_high_{i}", **STRENGTH,
                                     tooltip=f"Strength of LoRA {i} on the high-noise expert (0: not applied)."),
                      io.Float.Input(f"strength_low_{i}", **STRENGTH,
                                     tooltip=f"Strength of LoRA {i} on the low-noise expert (0: not applied).")]
        return io.Schema(
            node_id="VeloxWanExpertLoraStack",
            display_name="Wan 2.2 Expert LoRA Stack (Velox)",
            category=CATEGORY,
            description="Wan 2.2 A14B: each LoRA with its own high-noise and low-noise strength, applied to the "
            "matching expert in one node (Lightning high/low files, reward LoRAs, style LoRAs). Warns when an "
            "MPS reward LoRA is on the low-noise expert or a file named for one expert is on the other.",
            inputs=[io.Model.Input("model_high_noise", tooltip="The high-noise expert (early, noisy steps)."),
                    io.Model.Input("model_low_noise", tooltip="The low-noise expert (late steps)."),
                    *slots, _stack_input()],
            outputs=[io.Model.Output(display_name="model_high_noise"), io.Model.Output(display_name="model_low_noise"),
                     LoraStack.Output(display_name="lora_stack"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model_high_noise, model_low_noise, lora_stack=None, **slots) -> io.NodeOutput:
        entries = _entries(lora_stack, [StackEntry(slots[f"lora_{i}"], slots[f"strength_high_{i}"],
                                                   slots[f"strength_low_{i}"]) for i in range(1, SLOTS + 1)])
        high, _, high_text = _apply(model_high_noise, None, entries, "high", "high-noise expert")
        low, _, low_text = _apply(model_low_noise, None, entries, "low", "low-noise expert")
        text = _with_warnings(f"{high_text}\n{low_text}", expert_warnings(entries))
        return io.NodeOutput(high, low, entries, text, ui=ui.PreviewText(text))


class VeloxWanRewardLoras(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxWanRewardLoras",
            display_name="Wan 2.2 Reward LoRAs (Velox)",
            category=CATEGORY,
            description="The Wan2.2-Fun-A14B reward LoRAs (MPS, HPS2.1; one file per expert, rank 128 / alpha 64) "
            "as a stack for the Wan 2.2 Expert LoRA Stack: each file on its own expert, MPS and HPS2.1 blended "
            "by weight (0.6 MPS + 0.4 HPS2.1 by default). The recommended preset keeps MPS off the low-noise "
            "expert, as its authors advise. Files are looked up in models/loras under their release names.",
            inputs=[io.Combo.Input("preset", options=list(REWARD_PRESETS), default=next(iter(REWARD_PRESETS)),
                                   tooltip="Which reward LoRAs go on which expert."),
                    io.Float.Input("mps_weight", default=DEFAULT_MPS_WEIGHT, min=0.0, max=1.0, step=0.05,
                                   tooltip="Share of MPS in a blend (HPS2.1 gets the rest)."),
                    io.Float.Input("strength_high", default=DEFAULT_REWARD_STRENGTH, min=-10.0, max=10.0, step=0.01,
                                   tooltip="Total reward-LoRA strength on the high-noise expert (upstream: 0.55)."),
                    io.Float.Input("strength_low", default=DEFAULT_REWARD_STRENGTH, min=-10.0, max=10.0, step=0.01,
                                   tooltip="Total reward-LoRA strength on the low-noise expert (upstream: 0.55)."),
                    _stack_input()],
            outputs=[LoraStack.Output(display_name="lora_stack"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, preset, mps_weight, strength_high, strength_low, lora_stack=None) -> io.NodeOutput:
        from ..host.lora_stack import check_lora_file_family, lora_path

        entries = reward_preset_entries(preset, mps_weight, strength_high, strength_low)
        for entry in entries:  # a missing or foreign release file is named now, not at sampling
            check_lora_file_family(lora_path(entry.lora_name), "wan", entry.lora_name)
        text = _with_warnings("reward LoRAs: " + "; ".join(e.describe() for e in entries), expert_warnings(entries))
        return io.NodeOutput([*(lora_stack or []), *entries], text, ui=ui.PreviewText(text))


class VeloxLoraBake(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxLoraBake",
            display_name="Bake LoRA Stack (Velox)",
            category=CATEGORY,
            description="Saves a weighted LoRA stack as one LoRA file (official diffusion_model.* keys, alpha = "
            "rank): the summed delta of every layer truncated to the chosen rank by SVD, bias and table diffs "
            "kept exactly. Writes to the output folder (loras/ by default) and reports the approximation error.",
            inputs=[io.Model.Input("model", tooltip="The model the stack is for (its layer names and shapes)."),
                    LoraStack.Input("lora_stack", tooltip="The stack to bake (from a LoRA stack or reward node)."),
                    io.Combo.Input("expert", options=["high_noise", "low_noise"], default="high_noise",
                                   tooltip="Which strengths of the stack to bake (single-model stacks: either)."),
                    io.Int.Input("rank", default=128, min=1, max=4096,
                                 tooltip="Rank of the baked LoRA (the reward LoRAs are 128 each)."),
                    io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="bf16",
                                   tooltip="Precision of the saved factors."),
                    io.String.Input("filename_prefix", default="loras/velox_baked_lora",
                                    tooltip="Path under the output folder; a counter is appended.")],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, lora_stack, expert, rank, save_dtype, filename_prefix) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        from ..host.lora_bake import bake_lora_stack, bake_metadata
        from ..host.lora_stack import StackItem, lora_path

        items = [StackItem(lora_path(e.lora_name), 1.0, name=e.lora_name) for e in lora_stack]
        strengths = [e.strength_high if expert == "high_noise" else e.strength_low for e in lora_stack]
        tensors, report = bake_lora_stack(model, items, strengths, rank, SAVE_DTYPES[save_dtype])
        if not tensors:
            raise ValueError("VeloxLoraBake: the stack changes no layer of this model (empty stack, all strengths "
                             "0 for this expert, or no key matched); nothing to save")
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix,
                                                                       folder_paths.get_output_directory())
        path = Path(folder) / f"{name}_{counter:05}_.safetensors"
        comfy.utils.save_torch_file(tensors, str(path), metadata=bake_metadata(items, strengths, rank))
        text = report.text(str(path), items, strengths)
        logging.info("Velox: %s", text)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


LORA_NODES = [VeloxLoraStack, VeloxWanExpertLoraStack, VeloxWanRewardLoras, VeloxLoraBake]

"""LoRA training nodes: a cached dataset from a folder, and ``VeloxTrainLora`` on a Wan MODEL.

Glue only: ``host.training_data`` decodes and encodes the folder, ``host.lora_training`` trains
(side-product LoRA, the family's flow-matching objective, AdamW) and saves the LoRA in the
``diffusion_model.<module>.lora_down / lora_up / alpha`` dialect that core and Velox both load.
"""

from __future__ import annotations

import logging
from pathlib import Path

from comfy_api.latest import io, ui

from ..errors import VeloxLoadError
from .lora_nodes import NONE, lora_choices
from .queue_validation import VeloxNode

CATEGORY = "Velox/Training"
TrainingData = io.Custom("VELOX_TRAINING_DATA")
PREVIEW_EVERY = 20  # loss-curve previews per run


class VeloxLoraDataset(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxLoraDataset",
            display_name="LoRA Training Dataset (Velox)",
            category=CATEGORY,
            description="A folder of images / videos (mp4, webm, mov, gif, webp) with same-name .txt captions, "
            "encoded once through the VAE and text encoder and cached on disk. Bad files are skipped and "
            "named in the report; Wan clips are trimmed to 4n + 1 frames.",
            inputs=[io.String.Input("folder", default="lora_dataset",
                                    tooltip="The folder: absolute, or relative to ComfyUI's input folder."),
                    io.Vae.Input("vae", tooltip="The family's VAE (Wan VAE for Wan)."),
                    io.Clip.Input("clip", tooltip="The family's text encoder (umT5 for Wan)."),
                    io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Frame width (pixels)."),
                    io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Frame height (pixels)."),
                    io.Int.Input("max_frames", default=33, min=1, max=1024,
                                 tooltip="Longest clip, in sampled frames (Wan trims to 4n + 1)."),
                    io.Float.Input("fps", default=16.0, min=0.1, max=120.0, tooltip="Frames per second sampled "
                                   "from each video.")],
            outputs=[TrainingData.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        return [f"{n} {values[n]} is not a multiple of 16" for n in ("width", "height")
                if isinstance(values.get(n), int) and values[n] % 16]

    @classmethod
    def execute(cls, folder, vae, clip, width, height, max_frames, fps) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        from ..host.training_data import DatasetSettings, build_dataset

        path = Path(folder) if Path(folder).is_absolute() else Path(folder_paths.get_input_directory()) / folder
        bar = comfy.utils.ProgressBar(1)
        cache = Path(folder_paths.get_user_directory()) / "velox" / "training_cache"
        samples, report = build_dataset(path, vae, clip, DatasetSettings(width, height, fps, max_frames), cache,
                                        progress=lambda done, total: bar.update_absolute(done, total))
        text = report.text()
        logging.info("Velox dataset %s: %s", path, text)
        return io.NodeOutput(samples, text, ui=ui.PreviewText(text))


def _train_inputs() -> list[io.Input]:
    return [
        io.Int.Input("rank", default=16, min=1, max=512, tooltip="LoRA rank."),
        io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, tooltip="LoRA alpha (scale alpha / rank)."),
        io.Combo.Input("targets", options=["attention", "attention_ffn"], default="attention",
                       tooltip="Layers given a LoRA: attention q/k/v/o only, or attention and the FFN."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, tooltip="AdamW learning rate."),
        io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Clips per micro-batch (one size)."),
        io.Int.Input("grad_accumulation", default=1, min=1, max=64, tooltip="Micro-batches per optimizer step."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seeds the LoRA init, clip order, noise "
                     "and timesteps."),
        io.Combo.Input("lora_dtype", options=["fp32", "bf16"], default="fp32", tooltip="The LoRA's own dtype."),
        io.Boolean.Input("gradient_checkpointing", default=False,
                         tooltip="Recompute each block in the backward pass: less memory, about 30 % slower."),
        io.Combo.Input("expert", options=["all", "high_noise", "low_noise"], default="all",
                       tooltip="Wan 2.2 A14B: train one expert on its side of the boundary ('all' for Wan 2.1)."),
        io.Float.Input("boundary", default=0.875, min=0.0, max=1.0, step=0.005,
                       tooltip="Wan 2.2 expert boundary in sigma (0.875 T2V, 0.900 I2V)."),
    ]


class VeloxTrainLora(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxTrainLora",
            display_name="Train LoRA (Velox)",
            category=CATEGORY,
            description="Trains a LoRA on a Wan MODEL (bf16, FP8, INT8 or GGUF base: the base stays frozen and "
            "quantized) with Wan's flow-matching objective and shift, AdamW. Writes models/loras/<name>."
            "safetensors (diffusion_model.<module>.lora_down/lora_up/alpha, training settings in the header), "
            "shows the loss curve as the progress preview, and keeps the last step's LoRA when interrupted.",
            inputs=[io.Model.Input("model", tooltip="The Wan model to train on (left unchanged)."),
                    TrainingData.Input("dataset", tooltip="From LoRA Training Dataset (Velox)."),
                    io.String.Input("lora_name", default="velox_lora", tooltip="File name under models/loras."),
                    *_train_inputs(),
                    io.Combo.Input("resume_from", options=lora_choices(), default=NONE,
                                   tooltip="Optional: continue from a LoRA saved by this node (same targets, rank).")],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="lora_name"),
                     io.Image.Output(display_name="loss")],
            is_output_node=True,
        )

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        """The LoRA is written under models/loras: its name must be a plain file name, never a path."""
        name = values.get("lora_name")
        if not isinstance(name, str):
            return []
        plain = name.strip() and Path(name).name == name and name not in (".", "..") and "\\" not in name
        return [] if plain else [f"lora_name {name!r} is not a plain file name (no folders, no '..')"]

    @classmethod
    def execute(cls, model, dataset, lora_name, rank, alpha, targets, learning_rate, steps, batch_size,
                grad_accumulation, seed, lora_dtype, gradient_checkpointing, expert, boundary,
                resume_from=NONE) -> io.NodeOutput:
        from ..host.lora_training import TrainConfig

        config = TrainConfig(rank, alpha, targets, learning_rate, steps, batch_size, grad_accumulation, seed,
                             lora_dtype, gradient_checkpointing=gradient_checkpointing, expert=expert,
                             boundary=boundary)
        cls.check_values(lora_name=lora_name)  # a linked name is known only now
        name = lora_name.removesuffix(".safetensors").strip() + ".safetensors"
        trained, losses, path = run_training(model, dataset, config, name, resume_from)
        return _outputs(trained, name, losses, path)


def _family(model) -> str:
    from ..loaders.lora_detect import FAMILY_NAMES, model_family

    family = model_family(model.model.state_dict().keys())
    if family != "wan":
        raise VeloxLoadError(None, f"VeloxTrainLora trains Wan models; this MODEL is "
                             f"{FAMILY_NAMES.get(family, 'of no family Velox knows')}", "a Wan MODEL")
    return family


def run_training(model, dataset, config, name: str, resume_from: str):
    """Train, save under models/loras/<name>; on an interrupt save the last whole step, then re-raise."""
    import comfy.model_management
    import comfy.utils
    import folder_paths

    from ..host.lora_stack import lora_path, read_lora
    from ..host.lora_training import TrainingInterrupted, save_lora, train_lora, training_metadata
    from ..host.loss_curve import loss_curve_image

    family = _family(model)
    path = Path(folder_paths.get_folder_paths("loras")[0]) / name
    resume = None if resume_from == NONE else (resume_from, read_lora(lora_path(resume_from)))
    bar = comfy.utils.ProgressBar(config.steps)
    losses: list[float] = []
    every = max(1, config.steps // PREVIEW_EVERY)

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        preview = ("PNG", loss_curve_image(losses, f"{name}: loss {loss:.4g}"), None) if step % every == 0 else None
        bar.update_absolute(step + 1, config.steps, preview)
        comfy.model_management.throw_exception_if_processing_interrupted()

    extra = {"velox.base_model": type(model.model).__name__, "velox.resumed_from": "" if resume is None else resume_from,
             "velox.samples": str(len(dataset))}
    try:
        result = train_lora(model, dataset, config, family, resume, on_step)
    except TrainingInterrupted as stop:
        save_lora(path, stop.result.lora, training_metadata(config, family, stop.result.losses, extra))
        logging.warning("Velox: training interrupted after %d step(s); %s keeps that LoRA", len(losses), path)
        raise stop.__cause__ from None
    save_lora(path, result.lora, training_metadata(config, family, result.losses, extra))
    return model, result.losses, path


def _outputs(model, name: str, losses: list[float], path: Path) -> io.NodeOutput:
    from ..host.lora_stack import StackItem, apply_lora_stack
    from ..host.loss_curve import image_tensor, loss_curve_image

    trained, _, _ = apply_lora_stack(model, None, [StackItem(path, 1.0, 0.0, name)])
    text = f"{name}: {len(losses)} step(s), loss {losses[0]:.4g} -> {losses[-1]:.4g}"
    return io.NodeOutput(trained, name, image_tensor(loss_curve_image(losses, text)), ui=ui.PreviewText(text))


LORA_TRAINING_NODES = [VeloxLoraDataset, VeloxTrainLora]

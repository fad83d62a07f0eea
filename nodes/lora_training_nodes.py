"""LoRA training nodes: a cached dataset from a folder, and ``VeloxTrainLora`` on a Wan, Sana or
VideoCrafter / DynamiCrafter MODEL (Wan 2.2: one expert, or both in one run).

Glue only: ``host.training_data`` decodes and encodes the folder, ``host.lora_training`` trains
(side-product LoRA, the family's objective, AdamW) and saves the LoRA in the
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
TRAINABLE_FAMILIES = ("wan", "sana", "sana_video", "videocrafter")
EXPERT_SUFFIXES = ("_high_noise", "_low_noise")  # Wan 2.2, both experts in one run


class VeloxLoraDataset(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxLoraDataset",
            display_name="LoRA Training Dataset (Velox)",
            category=CATEGORY,
            description="A folder of images / videos (mp4, webm, mov, gif, webp) with same-name .txt captions, "
            "encoded once through the VAE and text encoder and cached on disk. Bad files are skipped and "
            "named in the report; Wan clips are trimmed to 4n + 1 frames. The folder is looked up in "
            "ComfyUI's input folder, then in models/training_data.",
            inputs=[io.String.Input("folder", default="lora_dataset",
                                    tooltip="The folder: absolute, or relative to ComfyUI's input folder or to "
                                    "models/training_data."),
                    io.Vae.Input("vae", tooltip="The family's VAE (Wan VAE for Wan)."),
                    io.Clip.Input("clip", tooltip="The family's text encoder (umT5 for Wan)."),
                    io.Int.Input("width", default=832, min=16, max=4096, step=16, tooltip="Frame width (pixels)."),
                    io.Int.Input("height", default=480, min=16, max=4096, step=16, tooltip="Frame height (pixels)."),
                    io.Int.Input("max_frames", default=33, min=1, max=1024,
                                 tooltip="Longest clip, in sampled frames (Wan trims to 4n + 1)."),
                    io.Float.Input("fps", default=16.0, min=0.1, max=120.0, tooltip="Frames per second sampled "
                                   "from each video."),
                    io.ClipVision.Input("clip_vision", optional=True,
                                        tooltip="Image-to-video releases (DynamiCrafter): the loader's CLIP_VISION; "
                                        "each clip's first frame is encoded as the model's image condition.")],
            outputs=[TrainingData.Output(display_name="dataset"), io.String.Output(display_name="report")],
        )

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        return [f"{n} {values[n]} is not a multiple of 16" for n in ("width", "height")
                if isinstance(values.get(n), int) and values[n] % 16]

    @classmethod
    def execute(cls, folder, vae, clip, width, height, max_frames, fps, clip_vision=None) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        from ..host.training_data import DatasetSettings, build_dataset

        path = dataset_folder(folder)
        bar = comfy.utils.ProgressBar(1)
        cache = Path(folder_paths.get_user_directory()) / "velox" / "training_cache"
        samples, report = build_dataset(path, vae, clip, DatasetSettings(width, height, fps, max_frames), cache,
                                        progress=lambda done, total: bar.update_absolute(done, total),
                                        clip_vision=clip_vision)
        text = report.text()
        logging.info("Velox dataset %s: %s", path, text)
        return io.NodeOutput(samples, text, ui=ui.PreviewText(text))


def dataset_folder(folder: str) -> Path:
    """An absolute folder as is; a relative one in ComfyUI's input folder, else in a ``training_data``
    models folder (where the demo dataset lives), else the input folder's (missing) path for the error."""
    import folder_paths

    if Path(folder).is_absolute():
        return Path(folder)
    in_input = Path(folder_paths.get_input_directory()) / folder
    if in_input.is_dir():
        return in_input
    roots = folder_paths.folder_names_and_paths.get("training_data", ([], set()))[0]
    return next((Path(root) / folder for root in roots if (Path(root) / folder).is_dir()), in_input)


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
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                     tooltip="Seeds the LoRA init, clip order, noise and timesteps."),
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
            description="Trains a LoRA on a Wan, Sana or VideoCrafter 2 / DynamiCrafter MODEL (bf16, FP8, INT8 or "
            "GGUF base: the base stays frozen and quantized) with the family's objective (flow matching at the "
            "model's shift; eps / v on the release's DDPM schedule), AdamW. Writes models/loras/<name>."
            "safetensors (diffusion_model.<module>.lora_down/lora_up/alpha, training settings in the header), "
            "shows the loss curve as the progress preview, and keeps the last step's LoRA when interrupted. "
            "With a low-noise model too, trains both Wan 2.2 experts in one run (<name>_high_noise / "
            "<name>_low_noise), each on its side of the boundary.",
            inputs=[io.Model.Input("model", tooltip="The model to train on (left unchanged); with low_noise_model "
                                   "connected, the Wan 2.2 high-noise expert."),
                    TrainingData.Input("dataset", tooltip="From LoRA Training Dataset (Velox)."),
                    io.String.Input("lora_name", default="velox_lora", tooltip="File name under models/loras."),
                    *_train_inputs(),
                    io.Combo.Input("resume_from", options=lora_choices(), default=NONE,
                                   tooltip="Optional: continue from a LoRA saved by this node (same targets, rank); "
                                   "for both experts, the <name>_high_noise file (its _low_noise twin is read too)."),
                    io.Model.Input("low_noise_model", optional=True,
                                   tooltip="Wan 2.2 A14B: the low-noise expert. Both experts then train in one run, "
                                   "each sample on the expert its sigma belongs to (high noise at sigma >= "
                                   "boundary), expert set to 'all'.")],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="lora_name"),
                     io.Image.Output(display_name="loss"), io.Model.Output(display_name="low_noise_model")],
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
                resume_from=NONE, low_noise_model=None) -> io.NodeOutput:
        from ..host.lora_training import TrainConfig

        config = TrainConfig(rank, alpha, targets, learning_rate, steps, batch_size, grad_accumulation, seed,
                             lora_dtype, gradient_checkpointing=gradient_checkpointing, expert=expert,
                             boundary=boundary)
        cls.check_values(lora_name=lora_name)  # a linked name is known only now
        name = lora_name.removesuffix(".safetensors").strip() + ".safetensors"
        models = [model] if low_noise_model is None else [model, low_noise_model]
        losses, paths = run_training(models, dataset, config, name, resume_from)
        return _outputs(models, losses, paths)


def _family(model, role: str = "model") -> str:
    from ..loaders.lora_detect import FAMILY_NAMES, model_family

    family = model_family(model.model.state_dict().keys())
    if family not in TRAINABLE_FAMILIES:
        raise VeloxLoadError(None, f"VeloxTrainLora trains Wan, Sana, SANA-Video and VideoCrafter / DynamiCrafter models; "
                             f"this {role} is {FAMILY_NAMES.get(family, 'of no family Velox knows')}",
                             "a Wan, Sana, SANA-Video or VideoCrafter MODEL")
    return family


def expert_names(name: str) -> list[str]:
    """<stem>_high_noise.safetensors and <stem>_low_noise.safetensors."""
    stem = name.removesuffix(".safetensors")
    return [f"{stem}{suffix}.safetensors" for suffix in EXPERT_SUFFIXES]


def _resume(resume_from: str, experts: bool):
    """(name, tensors) of the LoRA to resume from, or a pair of them for both experts; None for none."""
    from ..host.lora_stack import lora_path, read_lora

    if resume_from == NONE:
        return None
    if not experts:
        return resume_from, read_lora(lora_path(resume_from))
    high_suffix = EXPERT_SUFFIXES[0] + ".safetensors"
    if not resume_from.endswith(high_suffix):
        raise VeloxLoadError(resume_from, "is not a high-noise expert LoRA of a two-expert run",
                             f"a <name>{high_suffix} file saved by VeloxTrainLora beside its "
                             f"<name>{EXPERT_SUFFIXES[1]}.safetensors twin")
    low = resume_from.removesuffix(high_suffix) + EXPERT_SUFFIXES[1] + ".safetensors"
    return tuple((n, read_lora(lora_path(n))) for n in (resume_from, low))


def run_training(models: list, dataset, config, name: str, resume_from: str):
    """Train ``models`` (one, or the two Wan 2.2 experts), save under models/loras; on an interrupt save
    the last whole step, then re-raise. Returns (losses, saved paths in the models' order)."""
    import comfy.model_management
    import comfy.utils
    import folder_paths

    from ..host.lora_training import (
        TrainingInterrupted,
        save_lora,
        to_model_space,
        train_lora,
        train_lora_experts,
        training_metadata,
    )
    from ..host.loss_curve import loss_curve_image

    families = [_family(m, role) for m, role in zip(models, ("model", "low_noise_model"))]
    family = families[0]
    if len(models) == 2 and families != ["wan", "wan"]:
        raise VeloxLoadError(None, "low_noise_model is for Wan 2.2's two experts; model and low_noise_model must "
                             "both be Wan", "two Wan MODELs (high-noise, low-noise expert) or no low_noise_model")
    folder = Path(folder_paths.get_folder_paths("loras")[0])
    paths = [folder / n for n in ([name] if len(models) == 1 else expert_names(name))]
    resume = _resume(resume_from, len(models) == 2)
    samples = to_model_space(models[0], dataset)
    bar = comfy.utils.ProgressBar(config.steps)
    losses: list[float] = []
    every = max(1, config.steps // PREVIEW_EVERY)

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        preview = ("PNG", loss_curve_image(losses, f"{name}: loss {loss:.4g}"), None) if step % every == 0 else None
        bar.update_absolute(step + 1, config.steps, preview)
        comfy.model_management.throw_exception_if_processing_interrupted()

    extra = {"velox.base_model": type(models[0].model).__name__, "velox.samples": str(len(dataset)),
             "velox.resumed_from": "" if resume_from == NONE else resume_from}

    def save(result) -> None:
        loras = [result.lora] if len(models) == 1 else [result.lora, result.low_noise_lora]
        for index, (path, lora) in enumerate(zip(paths, loras)):
            expert = {} if len(models) == 1 else {"velox.expert": EXPERT_SUFFIXES[index].lstrip("_")}
            save_lora(path, lora, training_metadata(config, family, result.losses, {**extra, **expert}))

    try:
        if len(models) == 1:
            result = train_lora(models[0], samples, config, family, resume, on_step)
        else:
            result = train_lora_experts(models[0], models[1], samples, config, resume, on_step)
    except TrainingInterrupted as stop:
        save(stop.result)
        logging.warning("Velox: training interrupted after %d step(s); %s keep(s) that LoRA", len(losses),
                        ", ".join(map(str, paths)))
        raise stop.__cause__ from None
    save(result)
    return result.losses, paths


def _outputs(models: list, losses: list[float], paths: list[Path]) -> io.NodeOutput:
    from ..host.lora_stack import StackItem, apply_lora_stack
    from ..host.loss_curve import image_tensor, loss_curve_image

    trained = [apply_lora_stack(m, None, [StackItem(p, 1.0, 0.0, p.name)])[0] for m, p in zip(models, paths)]
    names = ", ".join(p.name for p in paths)
    text = f"{names}: {len(losses)} step(s), loss {losses[0]:.4g} -> {losses[-1]:.4g}"
    low = trained[1] if len(trained) == 2 else None
    return io.NodeOutput(trained[0], paths[0].name, image_tensor(loss_curve_image(losses, text)), low,
                         ui=ui.PreviewText(text))


LORA_TRAINING_NODES = [VeloxLoraDataset, VeloxTrainLora]

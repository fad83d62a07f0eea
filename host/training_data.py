"""A folder of images / videos with same-name ``.txt`` captions -> cached training samples.

Each file is decoded (images as one frame; videos sampled at ``fps`` up to ``max_frames``), resized and
centre-cropped to (height, width), trimmed to the VAE's frame rule (Wan: 4n + 1), encoded once through
the VAE and the text encoder, and cached on disk as ``{latent (C, T, H, W), context (L, D)}`` under a
key of the file, its caption, the settings and the encoders. Latents are the VAE's raw ones (core's
``VAE.encode``: a video VAE gives (1, C, T', h, w), an image VAE one (C, h, w) per frame, stacked along
T); the trainer maps them into the model's space. With a CLIP_VISION the first frame's tokens are
cached too (DynamiCrafter trains on them). A caption's padding tokens (Sana's Gemma pads to a fixed
length and masks) are dropped. A file that cannot be decoded is skipped and named in the report; a
folder with nothing usable is an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from ..errors import VeloxLoadError
from .lora_training import Sample
from .sana_text_encoder import SanaGemmaTokenizer
from .sana_video_conditioning import encode_sana_video_prompt

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
PIL_ANIMATED = (".gif", ".webp")  # PIL reads these, animated or not
AV_VIDEOS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + PIL_ANIMATED + AV_VIDEOS
CACHE_VERSION = "3"  # bump when what a cache file holds changes
DATASET_EXPECTED = f"a folder of images or videos ({', '.join(MEDIA_EXTENSIONS)}) with same-name .txt captions"


@dataclass
class DatasetSettings:
    width: int
    height: int
    fps: float
    max_frames: int


@dataclass
class DatasetReport:
    encoded: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{len(self.encoded) + len(self.cached)} clip(s): {len(self.encoded)} encoded, "
                 f"{len(self.cached)} from the cache"]
        lines += [f"skipped {line}" for line in self.skipped] + [f"note: {line}" for line in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------


def decode_media(path: Path, fps: float, max_frames: int) -> torch.Tensor:
    """frames (T, H, W, 3) float in [0, 1]; raises on anything it cannot decode."""
    suffix = path.suffix.lower()
    if suffix in AV_VIDEOS:
        frames = _decode_av(path, fps, max_frames)
    else:
        with Image.open(path) as image:
            frames = _sample_pil(image, fps, max_frames)
    if not frames:
        raise ValueError("no frames")
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)


def _sample_pil(image: Image.Image, fps: float, max_frames: int) -> list[np.ndarray]:
    frames, clock, next_time = [], 0.0, 0.0
    for frame in ImageSequence.Iterator(image):
        if clock + 1e-9 >= next_time:
            frames.append(np.asarray(frame.convert("RGB")))
            next_time += 1.0 / fps
        clock += frame.info.get("duration", 1000.0 / fps) / 1000.0
        if len(frames) >= max_frames:
            break
    return frames


def _decode_av(path: Path, fps: float, max_frames: int) -> list[np.ndarray]:
    import av

    frames, next_time = [], 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            time = float(frame.time) if frame.time is not None else len(frames) / fps
            if time + 1e-6 >= next_time:
                frames.append(frame.to_ndarray(format="rgb24"))
                next_time += 1.0 / fps
            if len(frames) >= max_frames:
                break
    return frames


def fit_frames(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(T, H, W, 3) -> (T, height, width, 3): scaled to cover, then centre-cropped."""
    t, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    resized = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=size, mode="bilinear",
                                              antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return resized[:, :, top:top + height, left:left + width].permute(0, 2, 3, 1).clamp(0, 1)


def wan_frame_count(frames: int) -> int:
    """The longest 4n + 1 that fits: Wan's VAE folds 4 frames into one latent after the first."""
    return 4 * ((frames - 1) // 4) + 1


# ----------------------------------------------------------------------------------------------
# encoding and the cache
# ----------------------------------------------------------------------------------------------


def media_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise VeloxLoadError(folder, "is not a folder", DATASET_EXPECTED)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)
    if not files:
        raise VeloxLoadError(folder, "holds no image or video", DATASET_EXPECTED)
    return files


def encoder_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of an encoder's first weights and its parameter count (which model encoded a sample)."""
    digest = hashlib.sha1()
    params = list(module.state_dict().values())
    digest.update(str(sum(p.numel() for p in params)).encode())
    for tensor in params[:4]:
        digest.update(tensor.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(path: Path, caption: str, settings: DatasetSettings, encoders: str) -> str:
    stat = path.stat()
    text = "|".join(map(str, (CACHE_VERSION, path.resolve(), stat.st_size, stat.st_mtime_ns, caption, settings,
                              encoders)))
    return hashlib.sha1(text.encode()).hexdigest()


def encode_text(clip, caption: str, video_vae: bool = False) -> torch.Tensor:
    """The caption's conditioning tensor (L, D) from core's CLIP, without its masked padding tokens.

    Gemma with a video VAE is SANA-Video: captions are encoded as its text node encodes prompts (the
    video instruction and the motion score), so the LoRA learns the conditioning it samples with."""
    if video_vae and isinstance(getattr(clip, "tokenizer", None), SanaGemmaTokenizer):
        conditioning = encode_sana_video_prompt(clip, caption)
    else:
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    cond, extra = conditioning[0][:2]
    context = cond[0].float().cpu()
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    if mask is not None and mask.shape[-1] == context.shape[0]:
        context = context[mask.reshape(-1).cpu().bool()]
    return context


def encode_video(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) -> the VAE's raw latent (C, T', h, w): a video VAE encodes the clip, an image VAE
    each frame."""
    latent = vae.encode(pixels).float().cpu()
    return latent[0] if latent.ndim == 5 else latent.movedim(0, 1)


def first_frame_tokens(clip_vision, pixels: torch.Tensor) -> torch.Tensor:
    """The CLIP-vision tokens (N, D) of the first frame, as VeloxDynamiCrafterConditioning makes them."""
    return clip_vision.encode_image(pixels[:1], crop=False)["last_hidden_state"][0].float().cpu()


def build_dataset(folder: str | Path, vae, clip, settings: DatasetSettings, cache_dir: Path,
                  progress: Callable[[int, int], None] | None = None,
                  clip_vision=None) -> tuple[list[Sample], DatasetReport]:
    """Every usable file of ``folder`` as a Sample (cached), and what happened to each file."""
    folder = Path(folder)
    files, report, samples = media_files(folder), DatasetReport(), []
    encoders = encoder_fingerprint(vae.first_stage_model) + encoder_fingerprint(clip.cond_stage_model)
    if clip_vision is not None:
        encoders += encoder_fingerprint(clip_vision.model)
    temporal = getattr(vae, "latent_dim", 2) == 3  # Wan's causal 3-D VAE takes 4n + 1 frames
    for index, path in enumerate(files):
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        cached = cache_dir / f"{cache_key(path, caption, settings, encoders)}.safetensors"
        try:
            samples.append(_load_or_encode(path, caption, cached, (vae, clip, clip_vision), settings, temporal,
                                           report))
            if not caption:
                report.notes.append(f"{path.name}: no caption ({caption_file.name}); trained with an empty prompt")
        except Exception as error:  # a bad file is reported, never the end of the run
            report.skipped.append(f"{path.name}: {type(error).__name__}: {str(error)[:160]}")
        if progress is not None:
            progress(index + 1, len(files))
    if not samples:
        raise VeloxLoadError(folder, "no file could be used: " + "; ".join(report.skipped[:5]), DATASET_EXPECTED)
    return samples, report


def _load_or_encode(path: Path, caption: str, cached: Path, encoders, settings: DatasetSettings,
                    temporal: bool, report: DatasetReport) -> Sample:
    from safetensors.torch import load_file, save_file

    vae, clip, clip_vision = encoders
    if cached.is_file():
        tensors = load_file(str(cached))
        report.cached.append(path.name)
        return Sample(tensors["latent"], tensors["context"], path.name, tensors.get("image_tokens"), settings.fps)
    frames = decode_media(path, settings.fps, settings.max_frames)
    if temporal and wan_frame_count(len(frames)) != len(frames):
        report.notes.append(f"{path.name}: {len(frames)} frames trimmed to {wan_frame_count(len(frames))} (4n + 1)")
        frames = frames[:wan_frame_count(len(frames))]
    pixels = fit_frames(frames, settings.width, settings.height)
    tensors = {"latent": encode_video(vae, pixels), "context": encode_text(clip, caption, temporal)}
    if clip_vision is not None:
        tensors["image_tokens"] = first_frame_tokens(clip_vision, pixels)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(cached))
    report.encoded.append(path.name)
    return Sample(tensors["latent"], tensors["context"], path.name, tensors.get("image_tokens"), settings.fps)

"""Convert a checkpoint to GGUF (Sana, Wan, VideoCrafter / DynamiCrafter, umT5, Gemma-2) or to core's NVFP4.

    python scripts/convert_to_gguf.py wan2.1_t2v_14B_bf16.safetensors --type Q4_K --device cuda
    python scripts/convert_to_gguf.py Sana_1600M_1024px_diffusers/ sana_1600m_Q8_0.gguf --type Q8_0
    python scripts/convert_to_gguf.py wan2.1_t2v_14B_bf16.safetensors --format nvfp4

Sources: a .safetensors file, a sharded *.safetensors.index.json, a diffusers folder (its
``--component``, default transformer) or a weights-only .pth/.pt/.ckpt. Types: Q8_0, Q4_0, Q5_0,
Q4_K, Q5_K, Q6_K, the llama.cpp mixes Q4_K_M / Q5_K_M (attention V and FFN-down in Q6_K), F16,
BF16, F32. Norms, biases, embeddings, modulation, heads and time / text embedders stay float (see
``loaders/gguf_families.py``); the table printed at the end says which tensor got which type and
why. Tensors are read, quantized and written one at a time (one block for Sana), so memory stays
near one layer; ``--device cuda`` quantizes on the GPU (on one CPU core Q4_K takes about 0.5 s per
million weights, the legacy types ~100x less).

``--format nvfp4`` (Sana and Wan) writes ComfyUI core's NVFP4 safetensors instead (``comfy_quant``
layers: e2m1 codes, e4m3 block scales, an fp32 global scale; ``loaders/nvfp4_convert.py``), with
the same keep-in-high-precision rules; ``--type`` and ``--fallback`` do not apply to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from velox_import import register_pack  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="checkpoint file, *.safetensors.index.json or diffusers folder")
    parser.add_argument("destination", type=Path, nargs="?",
                        help="output file (default: <source name>-<TYPE>.gguf or -NVFP4.safetensors next to "
                        "the source)")
    parser.add_argument("--format", default="gguf", choices=sorted(FORMATS),
                        help="gguf, or nvfp4: ComfyUI core's NVFP4 safetensors (Sana and Wan)")
    parser.add_argument("--type", default="Q8_0",
                        help="Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, Q4_K_M, Q5_K_M (V and FFN-down in Q6_K), "
                        "F16, BF16 or F32")
    parser.add_argument("--family", default="auto", help="auto, sana, wan, videocrafter, t5encoder, gemma2, generic")
    parser.add_argument("--fallback", default="auto",
                        help="float type of never-quantized tensors: auto (lossless), F16, BF16 or F32")
    parser.add_argument("--component", default="transformer", help="component of a diffusers folder")
    parser.add_argument("--device", default="cpu", help="where to quantize: cpu or cuda")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default; 1 is faster on a busy machine)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-tensor table")
    return parser.parse_args(argv)


SOURCE_SUFFIXES = (".safetensors.index.json", ".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def default_destination(source: Path, qtype: str, file_format: str = "gguf") -> Path:
    """``wan2.1_t2v_14B_bf16.safetensors`` -> ``wan2.1_t2v_14B_bf16-Q4_K.gguf`` / ``-NVFP4.safetensors``."""
    tag, suffix = (qtype.upper(), ".gguf") if file_format == "gguf" else ("NVFP4", ".safetensors")
    stem = next((source.name.removesuffix(end) for end in SOURCE_SUFFIXES if source.name.endswith(end)), source.name)
    return source.with_name(f"{stem}-{tag}{suffix}")


def convert_gguf(args: argparse.Namespace, destination: Path, progress):
    from velox.loaders.gguf_convert import convert_to_gguf

    return convert_to_gguf(args.source, destination, args.type, args.family, args.fallback,
                           args.component, args.device, progress)


def convert_nvfp4(args: argparse.Namespace, destination: Path, progress):
    from velox.loaders.nvfp4_convert import convert_to_nvfp4

    return convert_to_nvfp4(args.source, destination, args.family, args.component, args.device, progress)


def gguf_label(choice) -> str:
    from velox.kernels.gguf_types import type_name

    return type_name(choice.qtype)


# --format -> (converter, the label of a tensor's storage in the table)
FORMATS = {"gguf": (convert_gguf, gguf_label), "nvfp4": (convert_nvfp4, lambda choice: choice.storage)}


class Progress:
    """tqdm when it is installed, else a line every 5 % (tensor counts)."""

    def __init__(self, total: int | None, enabled: bool):
        self.enabled, self.total, self.done, self.bar, self.shown = enabled, total, 0, None, -1
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="tensor")
            except ImportError:
                pass

    def __call__(self, choice) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(choice.name[-40:])
        elif self.total and (percent := 100 * self.done // self.total) // 5 != self.shown // 5:
            self.shown = percent
            print(f"  {percent:3d}% ({self.done}/{self.total}) {choice.name}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    register_pack()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from velox.errors import VeloxLoadError
    from velox.loaders.gguf_source import open_checkpoint

    convert, label = FORMATS[args.format]
    destination = args.destination or default_destination(args.source, args.type, args.format)
    if destination.exists() and not args.overwrite:
        print(f"{destination} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        total = len(open_checkpoint(args.source, args.component).meta)
        progress = Progress(total, not args.quiet)
        start = time.perf_counter()
        report = convert(args, destination, progress)
        progress.close()
    except (VeloxLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        for choice in report.tensors:
            note = f"  ({choice.note})" if choice.note else ""
            print(f"{choice.name:<60} {list(choice.shape)!s:<24} {label(choice)}{note}")
    for note in report.notes:
        print(f"note: {note}")
    size = destination.stat().st_size / 2**30
    counts = ", ".join(f"{n} {name}" for name, n in sorted(report.type_counts().items()))
    print(f"{report.family} ({report.variant}) -> {destination}: {size:.2f} GiB, {counts}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA stacks at Wan-14B size: the bf16 merge of 4 rank-128 LoRAs, and the quantized Linear forward
with 4 stacked rank-128 LoRAs as unmerged low-rank side products vs without LoRAs.

    python bench/bench_lora.py merge                    # bf16 Wan-14B (40 blocks, dim 5120), 4 LoRAs
    python bench/bench_lora.py bake                     # the same 4 LoRAs baked to one rank-128 LoRA
    python bench/bench_lora.py forward --quant q4_k     # also int8, fp8_e4m3
    python bench/bench_lora.py all --size smoke --device cpu --quant int8   # CPU check of the code only

merge: the LoRAs (random, rank 128, alpha 64, the reward LoRAs' layers plus the FFN: 400 modules,
about 1.3 GB each in bf16) are written as safetensors, then timed: Velox's stack (key resolution +
``add_patches``), ComfyUI's ``patch_model`` merging them (backups to the CPU as in real use), and
the same through four chained core ``LoraLoaderModelOnly`` bodies for reference. The weights are
random: only the time is meaningful. Needs ~30 GB of GPU memory and ~12 GB of host memory for the
LoRAs (plus the merge backups when ``--offload cpu``). bake: ``VeloxLoraBake``'s SVD of that stack.

forward: one ``host/quant_ops.py`` Linear per Wan-14B shape (q/k/v/o and cross-attention q/o
5120->5120, FFN 5120->13824 and 13824->5120) at 480p x 81 frames (32 760 tokens), with and
without a ``LowRankSide`` of 4 x rank 128. The "block" ratio weights each shape by its count per
Wan block (cross-attention k/v see 512 text tokens); attention itself is not included, so the
ratio is an upper bound of the whole-model ratio (target <= 1.10x). Skips when quant_ops is absent.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import boot_comfy, cuda_time, emit, register_pack

TOKENS_480P = 21 * 60 * 104 // 4  # 81 frames -> 21 latent frames, 480x832 -> 60x104, 2x2 patches
TEXT_TOKENS = 512
# (out, in, tokens, count per block)
WAN14B_LINEARS = {"attn 5120->5120": (5120, 5120, TOKENS_480P, 6), "cross kv 5120->5120": (5120, 5120, TEXT_TOKENS, 2),
                  "ffn up 5120->13824": (13824, 5120, TOKENS_480P, 1), "ffn down 13824->5120": (5120, 13824, TOKENS_480P, 1)}
RANK, ALPHA, LORAS = 128, 64.0, 4


SIZES = {"14b": (5120, 13824, 40), "smoke": (256, 512, 2)}  # dim, ffn_dim, blocks (smoke: a CPU check of the code)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wan14b_patcher(offload: str, size: str = "14b", device: str = "cuda"):
    """Core's WanModel at 14B size in bf16 on the GPU, random weights, wrapped in a ModelPatcher."""
    import comfy.model_detection
    import comfy.model_patcher

    from velox.tiny.wan import TinyWanConfig, wan_official_shapes

    dim, ffn_dim, blocks = SIZES[size]
    shapes = wan_official_shapes(TinyWanConfig("wan14b", dim=dim, ffn_dim=ffn_dim, num_layers=blocks))
    meta = {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in shapes.items()}
    config = comfy.model_detection.model_config_from_unet(meta, "")
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model(meta, "", device=torch.device(device))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device(offload))


def write_loras(patcher, folder: Path) -> list[Path]:
    from safetensors.torch import save_file

    from velox.loaders.lora_formats import lora_state_dict, random_lora_factors

    state = patcher.model.diffusion_model.state_dict()
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in state.items()
              if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2}
    paths = []
    for i in range(LORAS):
        factors = random_lora_factors(shapes, RANK, ALPHA, seed=i, dtype=torch.bfloat16, scale=0.01)
        paths.append(folder / f"lora_{i}.safetensors")
        save_file(lora_state_dict(factors, "kohya_fun" if i % 2 else "official"), str(paths[-1]))
    return paths


def timed(fn):
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - start


def bench_merge(args, patcher, paths: list[Path]) -> None:
    """Both merges twice, in alternating order: the first ``patch_model`` of a process also pays for
    first-touch host memory of the CPU backups (28 GB), which made the one measured first look slower."""
    import comfy.sd
    import comfy.utils

    from velox.host.lora_stack import StackItem, apply_lora_stack, read_lora

    device = torch.device(args.device)
    _, t_read = timed(lambda: [read_lora(p) for p in paths])

    def velox_stack():
        return apply_lora_stack(patcher, None, [StackItem(p, 0.5) for p in paths])[0]

    def core_chain():
        current = patcher
        for path in paths:
            lora = comfy.utils.load_torch_file(str(path), safe_load=True)
            current = comfy.sd.load_lora_for_models(current, None, lora, 0.5, 0)[0]
        return current

    times: dict[str, list[float]] = {"velox_stack_s": [], "velox_merge_s": [], "core_chain_load_s": [],
                                     "core_merge_s": []}
    order = [("velox", velox_stack), ("core", core_chain), ("core", core_chain), ("velox", velox_stack)]
    for name, build in order:
        model, t_build = timed(build)
        _, t_merge = timed(lambda: model.patch_model(device_to=device))
        model.unpatch_model(device_to=device)
        times["velox_stack_s" if name == "velox" else "core_chain_load_s"].append(round(t_build, 3))
        times["velox_merge_s" if name == "velox" else "core_merge_s"].append(round(t_merge, 3))
    emit({"bench": "lora_merge", "model": f"wan {args.size} bf16", "loras": LORAS, "rank": RANK,
          "offload": args.offload, "read_s": round(t_read, 3), "order": [n for n, _ in order], **times})


def bench_bake(args, patcher, paths: list[Path]) -> None:
    """The 4-LoRA blend baked to one rank-128 LoRA (QR + small SVD per layer) and its reported error."""
    from velox.host.lora_bake import bake_lora_stack
    from velox.host.lora_stack import StackItem

    items = [StackItem(p, 1.0) for p in paths]
    (tensors, report), seconds = timed(lambda: bake_lora_stack(patcher, items, [0.4, 0.3, 0.2, 0.1], RANK))
    emit({"bench": "lora_bake", "model": f"wan {args.size}", "loras": LORAS, "rank_in": RANK, "rank_out": RANK,
          "layers": report.layers, "seconds": round(seconds, 3), "relative_error": report.relative_error,
          "worst_layer_error": report.worst[0]})


def quantized_linear(out_features: int, in_features: int, quant: str, device: str = "cuda"):
    from velox.host.quant_ops import make_quant_operations
    from velox.host.quant_tensor import PackedWeight, quantize_weight

    layer = make_quant_operations("none").Linear(in_features, out_features, bias=True, device=device,
                                                 dtype=torch.bfloat16)
    layer.bias.data.normal_(0, 0.01)
    weight = torch.randn(out_features, in_features, device=device) * 0.02
    if quant == "q4_k":
        from bench_gguf_dequant import random_blocks
        from gguf import GGMLQuantizationType

        packed = PackedWeight(random_blocks(GGMLQuantizationType.Q4_K, (out_features, in_features)),
                              (out_features, in_features), qtype=int(GGMLQuantizationType.Q4_K))
    else:
        packed = quantize_weight(weight, {"int8": "int8", "fp8_e4m3": "fp8"}[quant])
    problem = layer._take_weight(packed, None, "bench")
    assert problem is None, problem
    return layer


def wall_clock(fn, repeat: int = 5) -> float:
    """CPU stand-in for ``cuda_time`` (the smoke size only checks the code runs)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_forward(args) -> None:
    try:
        import velox.host.quant_ops  # noqa: F401
    except ImportError as error:
        emit({"bench": "lora_quant_forward", "skipped": f"host/quant_ops.py unavailable: {error}"})
        return
    from velox.host.lowrank import LowRankSide

    device = args.device
    timer = cuda_time if device == "cuda" else wall_clock
    linears = WAN14B_LINEARS if args.size == "14b" else {"smoke 256->256": (256, 256, 64, 1)}
    totals = {"without": 0.0, "with": 0.0}
    for name, (out_f, in_f, tokens, count) in linears.items():
        layer = quantized_linear(out_f, in_f, args.quant, device)
        g = torch.Generator(device).manual_seed(0)
        terms = [(torch.randn(RANK, in_f, device=device, generator=g, dtype=torch.bfloat16) * 0.01,
                  torch.randn(out_f, RANK, device=device, generator=g, dtype=torch.bfloat16) * 0.01, 0.5 * ALPHA / RANK)
                 for _ in range(LORAS)]
        x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            without = timer(lambda: layer(x))
            layer.velox_lowrank = LowRankSide(terms)
            with_lora = timer(lambda: layer(x))
        totals["without"] += count * without
        totals["with"] += count * with_lora
        emit({"bench": "lora_quant_forward", "quant": args.quant, "layer": name, "tokens": tokens,
              "without_ms": round(without * 1e3, 3), "with_4x128_ms": round(with_lora * 1e3, 3),
              "ratio": round(with_lora / without, 3)})
    emit({"bench": "lora_quant_forward", "quant": args.quant, "layer": "wan14b block linears (weighted)",
          "ratio": round(totals["with"] / totals["without"], 3), "target": 1.10})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["merge", "bake", "forward", "all"])
    parser.add_argument("--quant", choices=["q4_k", "int8", "fp8_e4m3"], default="q4_k")
    parser.add_argument("--offload", choices=["cpu", "cuda"], default="cpu",
                        help="where ModelPatcher keeps weight backups while merged (ComfyUI: the CPU)")
    parser.add_argument("--size", choices=list(SIZES), default="14b", help="'smoke': tiny, to check the code on CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--comfyui", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_lora needs a CUDA GPU (or --size smoke --device cpu --offload cpu)")
    register_pack()
    boot_comfy(args.comfyui)
    if args.what in ("merge", "bake", "all"):
        patcher = wan14b_patcher(args.offload, args.size, args.device)
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_loras(patcher, Path(tmp))
            if args.what in ("merge", "all"):
                bench_merge(args, patcher, paths)
            if args.what in ("bake", "all"):
                bench_bake(args, patcher, paths)
    if args.what in ("forward", "all"):
        bench_forward(args)


if __name__ == "__main__":
    main()

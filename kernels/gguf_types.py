"""The GGUF tensor types Velox dequantizes, with their block layout, and the refusal of the rest."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import VeloxLoadError

Q = GGMLQuantizationType

# Every type here has a PyTorch twin and a Triton kernel; anything else (IQ1/IQ2/IQ3 grids,
# TQ, MXFP4, ...) is refused by name rather than sent to a slow numpy fallback.
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16,
    Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ4_NL, Q.IQ4_XS,
)

# (elements per block, bytes per block), as gguf-py's GGML_QUANT_SIZES states them.
BLOCK_LAYOUT: dict[GGMLQuantizationType, tuple[int, int]] = {t: GGML_QUANT_SIZES[t] for t in SUPPORTED_TYPES}

# Byte offsets of each block's fp16 fields (d, dmin / m). Every other bit pattern of a block is a
# valid quantized block; only these must hold finite values (test and benchmark data rely on it).
FP16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}

_SUPPORTED_NUMBERS = frozenset(int(t) for t in SUPPORTED_TYPES)

# IQ4_NL / IQ4_XS code book (llama.cpp's kvalues_iq4nl).
IQ4_NL_VALUES: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def type_name(qtype: int) -> str:
    """``"Q4_K"`` for a known GGML type number, ``"type 99"`` for one gguf-py does not know."""
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def check_supported(qtype: int, where: str | None = None, path: str | None = None) -> None:
    """Raise VeloxLoadError unless Velox can dequantize ``qtype``.

    ``where`` names the tensor (``"blocks.3.ffn.0.weight"``), ``path`` the file it came from, so the
    message reads ``"wan.gguf: tensor blocks.3.ffn.0.weight has type IQ1_M, which Velox cannot
    dequantize; expected one of F32, F16, ..."``.
    """
    if int(qtype) in _SUPPORTED_NUMBERS:
        return
    subject = f"tensor {where}" if where else "a tensor"
    raise VeloxLoadError(
        path,
        f"{subject} has type {type_name(qtype)}, which Velox cannot dequantize",
        "one of " + ", ".join(t.name for t in SUPPORTED_TYPES),
    )


def block_layout(qtype: int) -> tuple[int, int]:
    """(block_size, type_size) of a supported type."""
    return BLOCK_LAYOUT[GGMLQuantizationType(int(qtype))]

"""Fuzzing the GGUF header parser (issue #4, acceptance point 5): whatever the bytes, ``parse_gguf``
either returns records that lie inside the buffer or raises VeloxLoadError, never anything else.

Three generators, 10 500 cases in all, on in-memory bytes (no files, so the run takes seconds):
mutations of a valid file (bit flips, overwrites, cuts, splices), headers built field by field
from lying counts/lengths/types/dims, and raw random bytes behind the magic. The three deep runs
(about 25 s on 2 cores) are the `fuzz` tier, host-free like the unit tier and run by CI beside it;
the unit tier keeps a 1/20 pass of each generator.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velox.errors import VeloxLoadError
from velox.loaders.gguf_reader import parse_gguf
from velox.loaders.gguf_writer import INT32, TensorPlan, Typed, encode_header

FUZZ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
TYPES = [int(t) for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.IQ4_XS, Q.IQ2_XXS)]


def valid_file() -> bytes:
    plans = [TensorPlan("blocks.0.weight", Q.Q4_K, (2, 256)), TensorPlan("norm", Q.F32, (8,)),
             TensorPlan("conv", Q.F16, (2, 32))]
    metadata = {"general.architecture": "wan", "tokens": ["a", "b"], "scores": [0.5, 1.5],
                "comfy.gguf.orig_shape.conv": Typed(INT32, [2, 2, 16]), "nested": [[1, 2], [3]]}
    header, _ = encode_header(metadata, plans)
    data = b"".join(np.full(p.n_bytes + (-p.n_bytes % 32), 7, np.uint8).tobytes() for p in plans)
    return header + data


VALID = valid_file()


def check_parse(buffer: bytes) -> None:
    """The only allowed outcomes: VeloxLoadError, or records whose views are inside the buffer."""
    try:
        contents = parse_gguf(buffer, "fuzz.gguf")
    except VeloxLoadError as error:
        assert str(error).startswith("fuzz.gguf: ")
        return
    for record in contents.tensors.values():
        block_size, type_size = GGML_QUANT_SIZES[Q(record.qtype)]
        assert record.data.dtype == np.uint8 and record.data.ndim == 2
        assert record.data.size * block_size == record.n_elements * type_size
        assert record.data.size <= len(buffer)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "byte", "u64", "cut", "splice"]))
        # Past the magic mostly: a broken magic is one quick refusal, the header is the interesting part.
        low = 0 if kind == "flip" else min(4, len(data))
        position = draw(st.integers(low, max(low, len(data) - 1)))
        if kind == "flip" and position < len(data):
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif kind == "u64":
            value = draw(st.sampled_from([0, 1, 2, 31, 255, 1 << 31, 1 << 32, 1 << 62, (1 << 64) - 1]))
            data[position:position + 8] = struct.pack("<Q", value)
        elif kind == "cut":
            del data[position:]
        else:
            data[position:position] = draw(st.binary(max_size=16))
    return bytes(data)


def string(text: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text


@st.composite
def kv_entry(draw) -> bytes:
    key = string(draw(st.binary(max_size=12)))
    value_type = draw(st.integers(0, 14))
    if value_type == 9:
        item_type = draw(st.integers(0, 13))
        count = draw(st.sampled_from([0, 1, 3, 1 << 20, 1 << 62]))
        body = draw(st.binary(max_size=48))
        return key + struct.pack("<IIQ", 9, item_type, count) + body
    if value_type == 8:
        return key + struct.pack("<I", 8) + string(draw(st.binary(max_size=8)), draw(st.sampled_from(
            [None, 0, 7, 1 << 40])))
    return key + struct.pack("<I", value_type) + draw(st.binary(min_size=0, max_size=8))


@st.composite
def tensor_entry(draw) -> bytes:
    name = string(draw(st.sampled_from([b"w", b"x", b"blk.0.attn_q.weight", b""])))
    n_dims = draw(st.integers(0, 6))
    dims = [draw(st.sampled_from([0, 1, 3, 32, 256, 512, 1 << 31, 1 << 63])) for _ in range(n_dims)]
    qtype = draw(st.sampled_from(TYPES + [99]))
    offset = draw(st.sampled_from([0, 32, 64, 5, 1 << 40]))
    return name + struct.pack(f"<I{n_dims}QIQ", n_dims, *dims, qtype, offset)


@st.composite
def built(draw) -> bytes:
    kvs = draw(st.lists(kv_entry(), max_size=3))
    tensors = draw(st.lists(tensor_entry(), max_size=3))
    n_kv = draw(st.sampled_from([len(kvs), len(kvs) + 1, 1 << 40]))
    n_tensors = draw(st.sampled_from([len(tensors), len(tensors) + 1, (1 << 64) - 1]))
    version = draw(st.sampled_from([3, 3, 3, 3, 3, 2, 1, 0]))
    header = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    padding = b"\0" * draw(st.sampled_from([0, -len(header) % 32]))
    return header + padding + draw(st.binary(max_size=2048))


GENERATORS = {"mutated_valid_file": (mutated(), 4000, lambda buffer: buffer),
              "hand_built_header": (built(), 4500, lambda buffer: buffer),
              "random_bytes_after_the_magic": (st.binary(max_size=96), 2000, lambda tail: b"GGUF" + tail)}


def fuzz(generator: str, share: int) -> None:
    strategy, examples, to_buffer = GENERATORS[generator]

    @settings(max_examples=max(1, examples // share), **FUZZ)
    @given(strategy)
    def run(value):
        check_parse(to_buffer(value))

    run()


@pytest.mark.fuzz
@pytest.mark.parametrize("generator", list(GENERATORS))
def test_deep_fuzz_raises_only_clean_errors(generator):
    fuzz(generator, share=1)


@pytest.mark.parametrize("generator", list(GENERATORS))
def test_quick_fuzz_raises_only_clean_errors(generator):
    fuzz(generator, share=20)


def test_the_seed_file_parses():
    contents = parse_gguf(VALID, "seed.gguf")
    assert contents.tensors["conv"].shape == (2, 2, 16)


def test_a_dimension_no_array_can_take_is_a_clean_error():
    """Found by the fuzzer: dims (2**64 - 2**56, 0) hold no bytes, so only the dimension check catches them."""
    name = b"w"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    info = struct.pack("<Q", len(name)) + name + struct.pack("<IQQIQ", 2, 18374686479671623936, 0, 0, 0)
    body = header + info
    body += b"\0" * (-len(body) % 32) + b"\0" * 32
    with pytest.raises(VeloxLoadError, match="claims shape"):
        parse_gguf(body, "huge.gguf")

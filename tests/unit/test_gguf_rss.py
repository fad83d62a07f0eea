"""Loading a GGUF file never copies it into RAM (issue #4, acceptance point 4): peak RSS growth while
reading a generated 1.1 GB file and turning every record into a torch tensor stays under 10 % of
the file size.

The file is written sparse (header, then ``truncate`` to the full size), so making it costs
milliseconds and no disk space. The measurement runs in a fresh interpreter and reads its own
high-water mark (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``; Linux
only: ``ru_maxrss`` would start at pytest's size, inherited across fork); a control copy of one
tensor checks that the measurement does see real copies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from velox.loaders.gguf_writer import INT32, TensorPlan, Typed, encode_header

ROOT = Path(__file__).resolve().parents[2]
N_TENSORS, SIDE = 40, 5120  # 40 × Q8_0 5120×5120 (27.9 MB each) = 1.11 GB, a Wan-14B layer's scale

MEASURE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    from velox_import import register_pack
    register_pack()
    import numpy as np, torch
    from velox.loaders.gguf_reader import read_gguf, record_as_torch

    def peak_mb():  # this process's own high-water mark (ru_maxrss would inherit pytest's)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")

    reset_peak()
    before = peak_mb()
    contents = read_gguf(sys.argv[1])
    views = []
    for record in contents.tensors.values():
        tensor = record_as_torch(record)
        views.append((record.shape, tensor, int(tensor[0, :64].sum())))  # touches one page each
    loaded = peak_mb()
    control = np.array(next(iter(contents.tensors.values())).data)  # a real copy of one tensor
    control[:] = 1
    print(json.dumps({"before": before, "loaded": loaded, "control": peak_mb(), "n": len(views)}))
""")


def write_sparse_gguf(path: Path) -> int:
    plans = [TensorPlan(f"blocks.{i}.ffn.0.weight", Q.Q8_0, (SIDE, SIDE)) for i in range(N_TENSORS)]
    metadata = {"general.architecture": "wan",
                "comfy.gguf.orig_shape.blocks.0.ffn.0.weight": Typed(INT32, [SIDE, SIDE, 1])}
    header, offsets = encode_header(metadata, plans)
    size = len(header) + offsets[-1] + plans[-1].n_bytes
    with open(path, "wb") as out:
        out.write(header)
        out.truncate(size)
    return size


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM)")
def test_loading_a_1gb_gguf_keeps_peak_rss_growth_under_10_percent(tmp_path):
    path = tmp_path / "big.gguf"
    size = write_sparse_gguf(path)
    assert size >= 1 << 30
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(ROOT / "scripts")],
                            capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    size_mb = size / 2**20
    assert report["n"] == N_TENSORS
    growth = report["loaded"] - report["before"]
    assert growth <= 0.10 * size_mb, f"peak RSS grew {growth:.0f} MB reading a {size_mb:.0f} MB file"
    one_tensor_mb = SIDE * SIDE // 32 * 34 / 2**20
    assert report["control"] - report["loaded"] >= 0.9 * one_tensor_mb, "the measurement missed a real copy"

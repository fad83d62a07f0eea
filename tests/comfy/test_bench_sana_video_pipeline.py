"""bench/bench_sana_video_pipeline.py --tiny as the device runs it, on the CPU: diffusers' SanaVideoPipeline and
Velox's node path (VeloxSampler at preset sana_video_480p, the Wan VAE loader, core's VAE.decode) are timed
phase by phase, and in fp32 they end on the same latent and the same video. The same code times the 2B at
480x832, 81 frames, 50 steps on the device."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_sana_video_pipeline.py"
LOOP_RTOL = 1e-4  # relative L2, fp32, a whole sampling run (as tests/unit/test_sana_video_nodes.py)
PHASES = ("sampling_s", "decode_s", "whole_s")


def run_tiny_bench(comfy_host: Path, tmp_path: Path) -> list[dict]:
    env = dict(os.environ, COMFYUI_PATH=str(comfy_host), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=str(BENCH.parent), OUT=str(tmp_path))  # one thread: two spin-wait on a busy 2-core runner
    done = subprocess.run([sys.executable, str(BENCH), "--tiny"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert printed == written, "every printed line is also in $OUT/results.jsonl"
    return printed


def test_tiny_bench_times_both_sides_and_ends_on_diffusers_latent_and_video(comfy_host, tmp_path):
    diffusers_side, velox_side, both = run_tiny_bench(comfy_host, tmp_path)
    assert [diffusers_side["side"], velox_side["side"], both["side"]] == ["diffusers", "velox", "both"]
    for record in (diffusers_side, velox_side, both):
        assert (record["size"], record["frames"], record["steps"], record["tiny"]) == ("64x64", 9, 2, True)
    for side in (diffusers_side, velox_side):
        assert all(0 < side[phase] < 60 for phase in PHASES), side
        assert side["peak_gib"] is None and side["vae_dtype"] == "float32"  # CPU: no GPU peak, fp32 VAE
        assert all(both[f"{side['side']}_{phase}"] == side[phase] for phase in PHASES)
    for phase in PHASES:
        ratio = both[f"{phase[:-2]}_ratio"]
        assert math.isclose(ratio, both[f"velox_{phase}"] / both[f"diffusers_{phase}"], rel_tol=0.05)
    assert (both["cfg"], both["shift"], both["transformer_dtype"], both["device"]) == (6.0, 8.0, "float32", "cpu")
    assert both["video_shape"] == [1, 9, 64, 64, 3]
    assert both["latent_rel_l2_vs_diffusers"] <= LOOP_RTOL
    assert both["video_rel_l2_vs_diffusers"] <= LOOP_RTOL

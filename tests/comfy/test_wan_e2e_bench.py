"""bench/bench_wan_e2e.py --tiny on the session's server: both graphs (ours and core's two-KSamplerAdvanced
anchor) run through POST /prompt, save their videos and report every phase; the command line prints one
JSON line (that is ``main`` around ``bench_on`` and one more server boot, left out to keep this under a
minute). The same code path times the real-size run on the device."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASES = {"load", "text", "vae_encode", "sampling", "vae_decode", "save"}


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_wan_e2e", ROOT / "bench" / "bench_wan_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_anchor_graph_is_core_two_ksampler_advanced_split_two_plus_two():
    bench = bench_module()
    ours = bench.velox_prompt(bench.FULL_SIZE)
    core = bench.comfyui_prompt(ours)
    classes = sorted(node["class_type"] for node in core.values())
    assert classes.count("UNETLoader") == 2 and classes.count("KSamplerAdvanced") == 2
    assert "VeloxWanExpertSampler" not in classes and "VeloxWanLoader" not in classes
    first, second = core["9a"]["inputs"], core["9b"]["inputs"]
    assert (first["start_at_step"], first["end_at_step"], second["start_at_step"]) == (0, 2, 2)
    assert (first["add_noise"], first["return_with_leftover_noise"], second["add_noise"]) == (
        "enable", "enable", "disable")
    assert ours["8"]["inputs"]["width"] == 832 and ours["8"]["inputs"]["length"] == 81


def test_tiny_bench_times_both_graphs_phase_by_phase(server):
    bench = bench_module()
    result = bench.bench_on(server, tiny=True, runs=2, timeout=120)
    assert set(result["runs"]) == {"velox", "comfyui"}
    for name, runs in result["runs"].items():
        first, second = runs
        assert PHASES <= set(first["phases_s"]), (name, first)
        assert {"vae_encode", "sampling", "vae_decode", "save"} <= set(second["phases_s"]), (name, second)
        for run in runs:
            assert 0 < run["total_s"] <= run["finished_s"], (name, run)
            assert 0 < sum(run["phases_s"].values()) <= run["finished_s"] + 0.05, (name, run)
    assert result["velox_over_comfyui"] > 0
    assert json.loads(json.dumps(result)) == result, "the JSON line round-trips"

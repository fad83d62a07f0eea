"""scripts/tiers.sh: a failing tier never hides the tiers after it, and the run still fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

TIERS = Path(__file__).resolve().parents[2] / "scripts" / "tiers.sh"


def run_bash(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {TIERS}; {script}"],
                          capture_output=True, text=True)


def test_a_failing_browser_tier_lets_the_next_tiers_run_and_the_script_fail():
    result = run_bash('run_tier browser false; run_tier "unit + comfy" echo REPORTED; finish_tiers')
    assert "REPORTED" in result.stdout
    assert result.returncode != 0
    assert "FAILED tier: browser" in result.stderr and "unit + comfy" not in result.stderr


def test_all_tiers_passing_exits_zero():
    result = run_bash("run_tier one true; run_tier two true; finish_tiers")
    assert result.returncode == 0 and result.stderr == ""

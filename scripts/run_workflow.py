"""Run an API-format workflow headless on a ComfyUI host and copy its outputs to ./output/.

    python scripts/run_workflow.py example_workflows/api/sana_t2i.json \
        --comfyui .host/ComfyUI --extra-models .cache/demo_models --output output

Exits 1 naming the failing node and its message, 2 when the pack failed to import.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import ComfyServer, WorkflowError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON")
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (holds main.py)")
    parser.add_argument("--extra-models", type=Path, help="models folder appended after ComfyUI's own")
    parser.add_argument("--output", type=Path, default=Path("output"), help="where outputs are copied")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the run")
    args = parser.parse_args(argv)

    prompt = json.loads(args.workflow.read_text())
    with ComfyServer(args.comfyui, extra_models=args.extra_models) as server:
        if server.pack_import_failed():
            print(f"Velox failed to import into ComfyUI:\n{server.log_tail()}", file=sys.stderr)
            return 2
        try:
            result = server.run(prompt, timeout=args.timeout, progress=True)
        except WorkflowError as error:
            print(f"{args.workflow.name}: {error}", file=sys.stderr)
            return 1
    args.output.mkdir(parents=True, exist_ok=True)
    for file in result.files:
        shutil.copy2(file, args.output / file.name)
        print(f"wrote {args.output / file.name}")
    if not result.files:
        print(f"{args.workflow.name}: the workflow produced no output file", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

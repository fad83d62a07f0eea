"""Write the UI-format twin (LiteGraph, version 0.4) of an API-format workflow.

The node definitions come from a running ComfyUI's ``/object_info`` (this script boots one),
so widget values land in the order the frontend expects, including the hidden
``control_after_generate`` value that follows a seed widget.

    python scripts/api_to_ui_workflow.py example_workflows/api/sana_t2i.json \
        --comfyui .host/ComfyUI --out example_workflows/sana_t2i.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import ComfyServer  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN, ROW = 380, 260
NODE_SIZE = (340, 120)
VIEW = (1600, 1000)  # the canvas the opened workflow should fit (ComfyUI draws, so loads previews of, visible nodes only)
MAX_SCALE = 0.8


def fitting_scale(nodes: list[dict]) -> float:
    """The canvas zoom that shows every node: MAX_SCALE, or less for a wide or tall graph."""
    right = max(node["pos"][0] for node in nodes) + NODE_SIZE[0] + 40
    bottom = max(node["pos"][1] for node in nodes) + NODE_SIZE[1] + 40
    return min(MAX_SCALE, int(100 * min(VIEW[0] / right, VIEW[1] / bottom)) / 100)


def input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node's inputs, in the frontend's order."""
    specs = []
    for group in ("required", "optional"):
        defs = info["input"].get(group, {})
        for name in info.get("input_order", {}).get(group, list(defs)):
            spec = defs[name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            specs.append((name, kind, spec[1] if len(spec) > 1 else {}))
    return specs


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def depths(prompt: dict) -> dict[str, int]:
    memo: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in memo:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if is_link(v)]
            memo[node_id] = 1 + max((depth(s) for s in sources), default=-1)
        return memo[node_id]

    for node_id in prompt:
        depth(node_id)
    return memo


def convert(prompt: dict, object_info: dict) -> dict:
    links, nodes = [], {}
    column_rows: dict[int, int] = {}
    for order, (node_id, depth) in enumerate(sorted(depths(prompt).items(), key=lambda kv: (kv[1], int(kv[0])))):
        node = prompt[node_id]
        info = object_info[node["class_type"]]
        row = column_rows.get(depth, 0)
        column_rows[depth] = row + 1
        nodes[node_id] = {
            "id": int(node_id), "type": node["class_type"], "pos": [40 + depth * COLUMN, 40 + row * ROW],
            "size": list(NODE_SIZE), "flags": {}, "order": order, "mode": 0, "inputs": [],
            "outputs": [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (kind, name) in enumerate(zip(info["output"], info["output_name"]))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": [],
        }
        if "_meta" in node and node["_meta"].get("title") not in (None, info.get("display_name")):
            nodes[node_id]["title"] = node["_meta"]["title"]
    for node_id, node in prompt.items():
        target = nodes[node_id]
        for name, kind, options in input_specs(object_info[node["class_type"]]):
            value = node["inputs"].get(name)
            if is_link(value):
                link_id = len(links) + 1
                source = nodes[value[0]]
                out_type = source["outputs"][value[1]]["type"]
                links.append([link_id, int(value[0]), value[1], int(node_id), len(target["inputs"]), out_type])
                source["outputs"][value[1]]["links"].append(link_id)
                target["inputs"].append({"name": name, "type": kind, "link": link_id})
            elif kind in WIDGET_TYPES and name in node["inputs"]:
                target["widgets_values"].append(value)
                if options.get("control_after_generate"):
                    target["widgets_values"].append("fixed")
    scale = fitting_scale(list(nodes.values()))
    return {
        "last_node_id": max(int(i) for i in prompt), "last_link_id": len(links),
        "nodes": [nodes[i] for i in sorted(nodes, key=int)], "links": links, "groups": [],
        "config": {}, "extra": {"ds": {"scale": scale, "offset": [0, 0]}}, "version": 0.4,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", type=Path, nargs="+", help="API-format workflow files")
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=Path("example_workflows"))
    args = parser.parse_args(argv)
    with ComfyServer(args.comfyui) as server:
        object_info = server.get_json("/object_info")
    for path in args.workflows:
        ui = convert(json.loads(path.read_text()), object_info)
        target = args.out_dir / path.name
        target.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

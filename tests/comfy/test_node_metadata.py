"""Every Velox node, as the real server lists it: a Velox/… category, a description, a tooltip per input."""

from __future__ import annotations

import pytest

PACK_MODULE = "custom_nodes.velox"


@pytest.fixture(scope="module")
def velox_nodes(server) -> dict:
    listed = server.get_json("/object_info")
    ours = {name: info for name, info in listed.items()
            if info.get("python_module", "").split("@")[0] == PACK_MODULE}
    assert len(ours) >= 8, f"only {sorted(ours)} come from {PACK_MODULE}"
    return ours


def test_node_ids_are_prefixed_velox(velox_nodes):
    strays = sorted(name for name in velox_nodes if not name.startswith("Velox"))
    assert not strays, f"Velox nodes whose ID lacks the Velox prefix: {strays}"


def test_every_node_has_a_velox_category(velox_nodes):
    bad = {name: info.get("category") for name, info in velox_nodes.items()
           if not str(info.get("category", "")).startswith("Velox/")}
    assert not bad, f"nodes outside a Velox/… category: {bad}"


def test_every_node_has_a_description(velox_nodes):
    bare = sorted(name for name, info in velox_nodes.items() if not str(info.get("description") or "").strip())
    assert not bare, f"nodes without a description: {bare}"


def test_every_input_has_a_tooltip(velox_nodes):
    missing = []
    for name, info in sorted(velox_nodes.items()):
        for group in ("required", "optional"):
            for field, spec in info["input"].get(group, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip") or "").strip():
                    missing.append(f"{name}.{field}")
    assert not missing, f"inputs without a tooltip: {missing}"

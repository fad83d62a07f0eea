"""Import this repository as the package ``velox`` outside ComfyUI (scripts, benches, tests).

ComfyUI imports the pack under a path-derived module name and the pack uses relative imports
only, so registering the repository root under a fixed name is all that is needed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def register_pack() -> None:
    if "velox" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("velox", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["velox"] = module
    spec.loader.exec_module(module)

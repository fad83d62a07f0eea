"""Browser tier: ComfyUI's real frontend in headless Chromium (Debian's), driven by Playwright.

One ComfyUI server on tiny demo checkpoints and one browser page serve the whole session. The
tier skips, with the reason, only when Chromium or the playwright package is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(HERE))

from browser_helpers import CHROMIUM, Frontend  # noqa: E402
from comfy_client import ComfyServer  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser/" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def playwright_driver():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -r requirements-test.txt)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VELOX_CHROMIUM)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser_models_dir(tmp_path_factory, comfy_host) -> Path:
    target = tmp_path_factory.mktemp("browser_models")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_models.py"), "--models-dir", str(target)],
                   check=True)
    return target


@pytest.fixture(scope="session")
def browser_server(playwright_driver, comfy_host, browser_models_dir):
    # VELOX_FRONT_END_ROOT serves another frontend build (scripts/test.sh: the newest on PyPI).
    front_end = os.environ.get("VELOX_FRONT_END_ROOT")
    extra = ["--front-end-root", front_end] if front_end else []
    with ComfyServer(comfy_host, extra_models=browser_models_dir, extra_args=extra) as running:
        yield running


@pytest.fixture(scope="session")
def frontend(playwright_driver, browser_server):
    app = Frontend(playwright_driver, browser_server.url)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="session")
def screenshots_dir() -> Path:
    target = ROOT / "output" / "browser"
    target.mkdir(parents=True, exist_ok=True)
    return target

"""Drive ComfyUI's real frontend in headless Chromium, and compare what it makes of a workflow.

``Frontend`` wraps one Playwright page on a running ComfyUI: it loads a UI-format workflow with
the app's own ``loadGraphData``, reads back the live nodes and the dialogs the app showed, asks
the app for its API prompt (``graphToPrompt``), queues through the Run button and waits for the
output images to appear on their nodes. The comparison functions are plain Python, and every
problem they report names the workflow, the node and the field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "example_workflows"
CHROMIUM = Path(os.environ.get("VELOX_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
# A fresh user: no template browser on first load, no minimap or "Nodes 2.0" banner over the canvas.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
INIT_SCRIPT = "localStorage.setItem('vueNodesBannerDismissed', 'true');"
RUN_EVENTS = ["execution_start", "executed", "execution_error", "execution_success", "execution_interrupted"]
# Sidebars that list queued outputs, by frontend generation: found by feature, never by version number.
# (1.32: Queue tab; 1.35: Assets tab with its own class; 1.58: Assets tab known only by its label.)
OUTPUT_SIDEBAR_BUTTONS = [".queue-tab-button", ".assets-tab-button", 'button.side-bar-button[aria-label^="Assets"]']

# The only inputs the UI = API comparison tolerates: ones a frontend extension adds to, or stops
# serializing on, a CORE node. Velox's nodes and every value a workflow sets stay strict.
FRONTEND_TOLERATED_INPUTS = {
    ("PreviewAny", "preview"): "display-only text widget of the frontend's Comfy.PreviewAny extension; "
                               "1.32 serializes it, 1.58 does not; the server ignores it",
    ("PreviewAny", "previewMode"): "BOOLEAN that the Comfy.PreviewAny extension adds since 1.35; the server "
                                   "accepts and ignores it",
}


def tolerated(class_type: str | None, field: str) -> bool:
    return (class_type, field) in FRONTEND_TOLERATED_INPUTS


def example_workflows() -> list[str]:
    """The UI-format example workflows (top level of example_workflows/), by name."""
    return sorted(path.stem for path in WORKFLOWS.glob("*.json"))


def load_ui_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def load_api_twin(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


# --------------------------------------------------------------------------- comparisons


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _same_value(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _label(node_id: str, node: dict) -> str:
    title = node.get("_meta", {}).get("title")
    shown = f" {title!r}" if title else ""
    return f"node {node_id} ({node.get('class_type')}{shown})"


def match_nodes(got: dict, expected: dict) -> dict[str, str]:
    """Map the API twin's node IDs onto the frontend's: the same ID when the class agrees, else the
    one node of the same class and title (or the same class) left, since the frontend may renumber."""
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    for node_id, node in expected.items():
        if node_id in got and got[node_id].get("class_type") == node.get("class_type"):
            mapping[node_id] = node_id
            taken.add(node_id)
    for key in (lambda n: (n.get("class_type"), n.get("_meta", {}).get("title")), lambda n: n.get("class_type")):
        for node_id, node in expected.items():
            if node_id in mapping:
                continue
            candidates = [g for g, other in got.items() if g not in taken and key(other) == key(node)]
            if len(candidates) == 1:
                mapping[node_id] = candidates[0]
                taken.add(candidates[0])
    return mapping


def compare_prompt(workflow: str, got: dict, expected: dict) -> list[str]:
    """Differences between the frontend's API prompt and the committed API twin (``_meta`` ignored)."""
    problems = []
    mapping = match_nodes(got, expected)
    for node_id in sorted(set(expected) - set(mapping), key=str):
        problems.append(f"{workflow}: {_label(node_id, expected[node_id])}: in the API twin, not in the UI's prompt")
    for node_id in sorted(set(got) - set(mapping.values()), key=str):
        problems.append(f"{workflow}: {_label(node_id, got[node_id])}: in the UI's prompt, not in the API twin")
    for node_id, got_id in mapping.items():
        want, have = expected[node_id]["inputs"], got[got_id]["inputs"]
        label = _label(node_id, expected[node_id])
        class_type = expected[node_id].get("class_type")
        for field in want:
            if field not in have and tolerated(class_type, field):
                continue
            if field not in have:
                problems.append(f"{workflow}: {label}: input {field!r} is missing from the UI's prompt "
                                f"(API twin: {want[field]!r})")
                continue
            a, b = have[field], want[field]
            if _is_link(b) or _is_link(a):
                if not (_is_link(a) and _is_link(b) and a[0] == mapping.get(b[0]) and a[1] == b[1]):
                    problems.append(f"{workflow}: {label}: input {field!r} is linked to {a!r} in the UI, "
                                    f"to {b!r} in the API twin")
            elif not _same_value(a, b):
                problems.append(f"{workflow}: {label}: input {field!r} is {a!r} in the UI, {b!r} in the API twin")
        for field in have:
            if field not in want and not tolerated(class_type, field):
                problems.append(f"{workflow}: {label}: input {field!r} is in the UI's prompt, not in the API twin "
                                f"(UI: {have[field]!r})")
    return problems


def widget_problems(workflow: str, ui: dict, live: list[dict]) -> list[str]:
    """Every node type is registered; every Velox node shows its widgets with the saved values; every
    combo value (model files included) is one the server offers."""
    problems = []
    saved = {str(node["id"]): node for node in ui.get("nodes", [])}  # newer frontends use string ids
    for node in live:
        title = f" {node['title']!r}" if node.get("title") else ""
        label = f"node {node['id']} ({node['type']}{title})"
        if not node["registered"]:
            problems.append(f"{workflow}: {label}: node type is not registered in the frontend (missing node)")
            continue
        widgets = node["widgets"]
        for widget in widgets:
            options = widget.get("options")
            if options is not None and widget["value"] not in options:
                problems.append(f"{workflow}: {label}: widget {widget['name']!r} holds {widget['value']!r}, "
                                f"which is not among the server's choices (missing model?)")
        if not node["type"].startswith("Velox"):
            continue
        values = saved.get(str(node["id"]), {}).get("widgets_values")
        if isinstance(values, dict):
            values = [values.get(widget["name"]) for widget in widgets]
        values = list(values or [])
        if len(values) != len(widgets):
            problems.append(f"{workflow}: {label}: {len(widgets)} widgets on the canvas "
                            f"({[w['name'] for w in widgets]}), {len(values)} saved values")
        for widget, value in zip(widgets, values):
            if not _same_value(widget["value"], value):
                problems.append(f"{workflow}: {label}: widget {widget['name']!r} shows {widget['value']!r}, "
                                f"the workflow saved {value!r}")
            if widget.get("hidden"):
                problems.append(f"{workflow}: {label}: widget {widget['name']!r} is hidden")
    return problems


# --------------------------------------------------------------------------- the page

LIVE_NODES_JS = """() => window.app.graph._nodes.map(n => ({
  id: n.id, type: n.type, title: n.title,
  registered: !!LiteGraph.registered_node_types[n.type],
  widgets: (n.widgets || []).map(w => ({
    name: w.name, value: w.value,
    options: (w.options && Array.isArray(w.options.values)) ? w.options.values : null,
    hidden: !!(w.hidden || (w.options && w.options.hidden)),
  })),
}))"""

MESSAGES_JS = """() => [...document.querySelectorAll('.p-dialog, .p-toast-message-error')]
  .filter(el => el.offsetParent !== null || el.getClientRects().length)
  .map(el => el.innerText.trim().replace(/\\s+/g, ' '))"""

LISTEN_JS = """(types) => {
  window.__veloxEvents = [];
  for (const type of types)
    window.app.api.addEventListener(type, e => window.__veloxEvents.push({type, detail: e.detail}));
}"""

# Resolves to {error} or {images: [...]} once the run ended and every image output is shown on its node.
RUN_STATE_JS = """() => {
  const events = window.__veloxEvents;
  const failed = events.find(e => e.type === 'execution_error' || e.type === 'execution_interrupted');
  if (failed) return {error: failed.detail};
  if (!events.some(e => e.type === 'execution_success')) return null;
  const shown = [];
  for (const e of events.filter(e => e.type === 'executed')) {
    const files = (e.detail.output && e.detail.output.images) || [];
    if (!files.length) continue;
    const node = window.app.graph.getNodeById(Number(e.detail.node)) || window.app.graph.getNodeById(e.detail.node);
    const imgs = (node && node.imgs) || [];
    for (const file of files) {
      const img = imgs.find(i => i.src.includes('filename=' + encodeURIComponent(file.filename)));
      if (!img || !img.complete || !img.naturalWidth) return null;
      shown.push({node: String(e.detail.node), filename: file.filename, width: img.naturalWidth, height: img.naturalHeight});
    }
  }
  return {images: shown};
}"""


def post_settings(url: str, settings: dict) -> None:
    request = urllib.request.Request(url + "/api/settings", data=json.dumps(settings).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass


class Frontend:
    """One headless Chromium with ComfyUI's app open; ``close`` ends the browser."""

    def __init__(self, playwright, url: str, boot_timeout_ms: int = 90_000):
        post_settings(url, SETTINGS)
        self.profile = tempfile.mkdtemp(prefix="velox-chromium-")
        self.context = playwright.chromium.launch_persistent_context(
            self.profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT)
        self.context.add_init_script(INIT_SCRIPT)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.goto(url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.vueAppReady",
                                    timeout=boot_timeout_ms)
        self.page.evaluate(LISTEN_JS, RUN_EVENTS)
        self.dismiss()

    def close(self) -> None:
        self.context.close()

    def messages(self) -> list[str]:
        """The text of every dialog and error toast the app shows now."""
        return self.page.evaluate(MESSAGES_JS)

    def dismiss(self) -> None:
        for _ in range(3):
            if not self.messages():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def load(self, workflow: dict, name: str | None = None) -> list[str]:
        """Load a UI-format workflow as the app does (in a tab called ``name``); returns the dialogs
        and error toasts it raised."""
        self.dismiss()
        self.page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                           [workflow, name])
        self.page.wait_for_timeout(500)  # dialogs open asynchronously after the graph is configured
        shown = self.messages()
        self.dismiss()
        return shown

    def live_nodes(self) -> list[dict]:
        return self.page.evaluate(LIVE_NODES_JS)

    def prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def queue_and_wait(self, timeout_ms: int = 180_000) -> dict:
        """Click Run and wait until the run ended and its images are shown on their nodes."""
        self.page.evaluate("() => { window.__veloxEvents.length = 0; }")
        self.page.click('[data-testid="queue-button"]')
        handle = self.page.wait_for_function(RUN_STATE_JS, timeout=timeout_ms, polling=250)
        return handle.json_value()

    def output_sidebar_button(self) -> str:
        """The selector of the sidebar tab that lists queued outputs in this frontend."""
        for selector in OUTPUT_SIDEBAR_BUTTONS:
            if self.page.locator(selector).count():
                return selector
        raise AssertionError(f"the frontend has none of the output sidebars {OUTPUT_SIDEBAR_BUTTONS}")

    def queue_sidebar_images(self, filenames: list[str], timeout_ms: int = 30_000) -> list[str]:
        """Open the sidebar that lists queued outputs (Queue, or Assets in newer frontends), wait until
        it shows each file as a loaded <img>, close it again."""
        button = self.output_sidebar_button()
        self.page.click(button)
        try:
            self.page.wait_for_function(
                """(names) => names.every(name => [...document.querySelectorAll('img')].some(img =>
                     img.src.includes('filename=' + encodeURIComponent(name)) && img.complete && img.naturalWidth))""",
                arg=filenames, timeout=timeout_ms, polling=250)
            return self.page.evaluate("() => [...document.querySelectorAll('img')].map(i => i.src)"
                                      ".filter(s => s.includes('/view?'))")
        finally:
            self.page.click(button)

    def fit_view(self) -> None:
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        self.page.wait_for_timeout(300)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fit_view()
        self.page.screenshot(path=str(path))
        return path


def check_workflow(frontend: Frontend, workflow: str, ui: dict, api: dict) -> list[str]:
    """Load ``ui`` and report everything that differs from what the workflow and its API twin promise."""
    problems = [f"{workflow}: the app showed: {text[:300]}" for text in frontend.load(ui, workflow)]
    problems += widget_problems(workflow, ui, frontend.live_nodes())
    problems += compare_prompt(workflow, frontend.prompt(), api)
    return problems

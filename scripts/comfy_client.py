"""Boot a ComfyUI host and run API-format workflows on it: the engine of the demo and comfy tests.

``ComfyServer`` starts ``main.py`` on 127.0.0.1 at a free port (``--cpu`` when torch sees no
GPU), optionally with extra model folders, and stops it on exit. ``run`` posts a prompt,
follows the websocket (per-step progress), and returns the outputs or a ``WorkflowError``
naming the failing node and its message.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_FOLDER = "velox"


class WorkflowError(RuntimeError):
    """A prompt that ComfyUI refused or that failed in a node."""

    def __init__(self, message: str, node_errors: dict | None = None):
        super().__init__(message)
        self.node_errors = node_errors or {}


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict
    files: list[Path] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def write_extra_model_paths(models_dir: Path, target: Path) -> Path:
    """An extra_model_paths.yaml that appends models_dir's standard folders after ComfyUI's own."""
    folders = ["diffusion_models", "text_encoders", "vae", "loras", "checkpoints", "clip_vision", "controlnet",
               "training_data"]
    lines = ["velox_demo:", f"  base_path: {models_dir.resolve()}"] + [f"  {f}: {f}" for f in folders]
    target.write_text("\n".join(lines) + "\n")
    return target


class ComfyServer:
    """A ComfyUI server process for the duration of a ``with`` block."""

    def __init__(self, comfyui: Path, extra_models: Path | None = None, output_dir: Path | None = None,
                 boot_timeout: float = 180.0, extra_args: list[str] | None = None):
        self.comfyui = Path(comfyui).resolve()
        self.extra_models = extra_models
        self.work = Path(tempfile.mkdtemp(prefix="velox-comfy-"))
        self.output_dir = Path(output_dir or self.work / "output").resolve()
        self.boot_timeout = boot_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.work / "server.log"
        self.process: subprocess.Popen | None = None
        self.extra_args = list(extra_args or [])

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self) -> list[str]:
        cmd = [sys.executable, str(self.comfyui / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.output_dir), "--disable-auto-launch",
               "--temp-directory", str(self.work), "--user-directory", str(self.work / "user")]
        if not _has_gpu():
            cmd.append("--cpu")
        if self.extra_models is not None:
            yaml = write_extra_model_paths(Path(self.extra_models), self.work / "extra_model_paths.yaml")
            cmd += ["--extra-model-paths-config", str(yaml)]
        return cmd + self.extra_args

    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.work / "user").mkdir(exist_ok=True)
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # main.py imports `comfy` from its own folder, which safe-path mode (what the tests set for
        # their children) would leave off sys.path; the server's cwd is the host, never this repository.
        env.pop("PYTHONSAFEPATH", None)
        self.process = subprocess.Popen(self.command(), cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.time() + self.boot_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited while starting (code {self.process.returncode}):\n{self.log_tail()}")
            try:
                self.get_json("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.boot_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_failed(self) -> bool:
        """True when ComfyUI logged IMPORT FAILED for this pack (not for ComfyUI's own extras)."""
        return any("IMPORT FAILED" in line and f"custom_nodes/{PACK_FOLDER}" in line
                   for line in self.log_text().splitlines())

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_prompt(self, prompt: dict, client_id: str) -> str:
        """Queue a prompt; raises WorkflowError with ComfyUI's node errors when it is refused."""
        body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}")
            raise WorkflowError(describe_refusal(detail, prompt), detail.get("node_errors")) from None

    def run(self, prompt: dict, timeout: float = 900.0, progress: bool = False) -> RunResult:
        return asyncio.run(self._run(prompt, timeout, progress))

    async def _run(self, prompt: dict, timeout: float, progress: bool) -> RunResult:
        client_id = uuid.uuid4().hex
        ws_url = f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}"
        import aiohttp  # ComfyUI's requirement: test collection without a host must not need it

        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            prompt_id = self.post_prompt(prompt, client_id)
            await asyncio.wait_for(_follow(ws, prompt_id, prompt, progress), timeout)
        outputs = await self._history_outputs(prompt_id)
        return RunResult(prompt_id, outputs, self.output_files(outputs))

    async def _history_outputs(self, prompt_id: str, wait: float = 30.0) -> dict:
        """The run's outputs; the history entry lands a moment after the websocket says done."""
        deadline = time.time() + wait
        while True:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]["outputs"]
            if time.time() > deadline:
                raise WorkflowError(f"prompt {prompt_id} finished but ComfyUI kept no history for it")
            await asyncio.sleep(0.1)

    def output_files(self, outputs: dict) -> list[Path]:
        files = []
        for node_output in outputs.values():
            for kind in ("images", "gifs", "videos", "animated", "audio"):
                for item in node_output.get(kind, []) if isinstance(node_output.get(kind), list) else []:
                    if isinstance(item, dict) and item.get("type") == "output":
                        files.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return files


def describe_refusal(detail: dict, prompt: dict) -> str:
    error = detail.get("error", {})
    lines = [f"ComfyUI refused the prompt: {error.get('message', 'invalid prompt')} {error.get('details', '')}".strip()]
    for node_id, node in (detail.get("node_errors") or {}).items():
        for problem in node.get("errors", []):
            lines.append(f"  node {node_id} ({node.get('class_type', prompt.get(node_id, {}).get('class_type'))}): "
                         f"{problem.get('message')}: {problem.get('details')}")
    return "\n".join(lines)


async def _follow(ws, prompt_id: str, prompt: dict, progress: bool) -> None:
    async for message in ws:
        if not isinstance(message.data, str):
            continue  # binary frames are previews
        event = json.loads(message.data)
        data = event.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        kind = event.get("type")
        if kind == "progress" and progress:
            _draw_progress(data, prompt)
        elif kind == "execution_error":
            node = data.get("node_id")
            raise WorkflowError(f"node {node} ({data.get('node_type')}) failed: "
                                f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}")
        elif kind == "execution_interrupted":
            raise WorkflowError(f"interrupted in node {data.get('node_id')} ({data.get('node_type')})")
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            if progress:
                print(file=sys.stderr)
            return


def _draw_progress(data: dict, prompt: dict) -> None:
    value, total = data.get("value", 0), max(1, data.get("max", 1))
    node = data.get("node")
    name = prompt.get(str(node), {}).get("class_type", node)
    filled = int(30 * value / total)
    print(f"\r{name:>24} [{'#' * filled}{'.' * (30 - filled)}] {value}/{total}", end="", file=sys.stderr, flush=True)

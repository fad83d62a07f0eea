"""The one error type Velox raises for bad input: it always names the file and what was expected.

It sits at the bottom of the layers (kernels, models, loaders and the host all raise it)."""

from __future__ import annotations

from pathlib import Path


class VeloxLoadError(ValueError):
    """A checkpoint, tokenizer or folder that Velox cannot load.

    The message starts with the file's name, so a node error in ComfyUI reads as
    ``"model.safetensors: <what is wrong>; expected <what would load>"``.
    """

    def __init__(self, path: str | Path | None, problem: str, expected: str | None = None):
        where = Path(path).name if path is not None else "<state dict>"
        message = f"{where}: {problem}"
        if expected:
            message += f"; expected {expected}"
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.problem = problem
        self.expected = expected

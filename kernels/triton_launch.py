"""Launch an already-compiled Triton kernel without Triton's per-call argument binding.

Why: every ``kernel[grid](...)`` call binds, specializes and hashes its arguments to find the
compiled kernel. In a launch-bound forward (Sana-1.6B at 1024²: about 160 quantized Linears of
2048 tokens) that host work cost more than the kernels themselves (H100, bench/bench_quant_overhead.py:
a Q8_0 dequantization took 52 us of host time for 5.6 us on the GPU; 22-24 us launched directly).

Contract: the caller keys each ``DirectLaunch`` by everything Triton specializes the kernel on
(dtypes, the integer arguments, pointer alignment), so the compiled kernel it reuses is the one
Triton would have picked; ``reproduces`` keeps it only after it matched Triton's own launch bit for bit.
Under ``TRITON_INTERPRET=1``, or with a Triton whose compiled kernels lack this interface, ``of``
returns None and callers stay on Triton's launcher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:
    import triton
    from triton import knobs
except ImportError:  # no Triton, or one before 3.4 (no knobs): Triton's own launcher every call
    triton = knobs = None

_INTERFACE = ("run", "function", "packed_metadata", "launch_metadata")


class DirectLaunch:
    """One compiled kernel and its grid: ``launch(*args)`` takes every argument in signature order,
    constexprs included (what Triton's own launcher passes to ``CompiledKernel.run``)."""

    __slots__ = ("kernel", "grid", "device_index")

    def __init__(self, kernel, grid: tuple[int, int, int], device_index: int):
        self.kernel, self.grid, self.device_index = kernel, grid, device_index

    @classmethod
    def of(cls, kernel, grid: tuple[int, int, int], device: torch.device) -> DirectLaunch | None:
        if knobs is None or device.type != "cuda" or not all(hasattr(kernel, name) for name in _INTERFACE):
            return None
        return cls(kernel, grid, device.index if device.index is not None else torch.cuda.current_device())

    def __call__(self, *args) -> None:
        kernel, grid = self.kernel, self.grid
        stream = triton.runtime.driver.active.get_current_stream(self.device_index)
        hooks = knobs.runtime
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *args), hooks.launch_enter_hook, hooks.launch_exit_hook,
                   *args)

    @staticmethod
    def reproduces(run: Callable[[], torch.Tensor], expected: torch.Tensor) -> bool:
        """Whether ``run()`` (a direct launch) gives ``expected`` (Triton's launch) bit for bit."""
        try:
            return torch.equal(_bits(run()), _bits(expected))
        except Exception:  # any drift in Triton's internal interface: stay on the checked path
            return False


ROW_BLOCK = 1024  # elements per loop step of a row-quantizing program
WIDE_ROW = 8192  # rows longer than this take the wide launch shape


def row_launch_shape(K: int) -> tuple[int, int]:
    """(elements per loop step, warps) of the per-token activation quantizers (FP8 and INT8 rows,
    one program per row of K values): the H100 sweep (bench/tune_act_quant.py, bench/RESULTS.md
    session 3) found 1024 x 4 warps best at K = 5120 and 2048 x 8 warps at 13 824 (Wan's FFN
    down-projection input: 0.63 vs 0.83 ms at 32 760 tokens)."""
    if K > WIDE_ROW:
        return 2048, 8
    return min(ROW_BLOCK, 1 << max(K - 1, 0).bit_length()), 4


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])

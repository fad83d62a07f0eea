"""The FP8 e4m3 storage format Velox quantizes to: dtype, largest finite value, smallest amax a scale
is computed from. One file of constants under ``fp8_linear`` (the PyTorch path) and
``fp8_quant_triton`` (its kernel), so the kernel does not import the module that launches it."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MIN_SCALE_AMAX = 1e-12

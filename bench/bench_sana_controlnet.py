"""Sana-1.6B + ControlNet step overhead at 1024², batch 2 (one CFG step), 300 text tokens (issue #18: the
step with the ControlNet <= 1.4x the plain step).

One step with the ControlNet is the ControlNet's forward (its embedders and the 7 copied blocks of the
HED releases) plus the base forward with the residuals added after blocks 1..7, as core's
``ControlNetApplyAdvanced`` drives it through ``control["input"]``. Random bf16 weights.

    python bench/bench_sana_controlnet.py [--modes eager compile] [--blocks 7]
"""

from __future__ import annotations

import argparse

import torch
from common import cuda_time, emit, register_pack


def build(blocks: int, dtype: torch.dtype):
    from velox.models.sana import SANA_PRESETS, SanaTransformer
    from velox.models.sana_controlnet import SanaControlNet

    kwargs = SANA_PRESETS["sana_1600m"].model_kwargs()
    torch.manual_seed(0)
    base = SanaTransformer(**kwargs, device="cuda", dtype=dtype).eval()
    control = SanaControlNet(**{**kwargs, "depth": blocks}, device="cuda", dtype=dtype).eval()
    for module in (base, control):
        for value in module.state_dict().values():
            value.normal_(0, 0.02) if value.dim() > 1 else value.fill_(1.0)
    return base, control


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    register_pack()
    dtype = torch.bfloat16
    base, control = build(args.blocks, dtype)
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 32, 32, 32, device="cuda", dtype=dtype, generator=g)
    hint = torch.randn(2, 32, 32, 32, device="cuda", dtype=dtype, generator=g)
    context = torch.randn(2, 300, 2304, device="cuda", dtype=dtype, generator=g)
    mask = torch.ones(2, 300, device="cuda", dtype=torch.int64)
    t = torch.full((2,), 750.0, device="cuda")
    for mode in args.modes:
        run_base = base if mode == "eager" else torch.compile(base, dynamic=False)
        run_control = control if mode == "eager" else torch.compile(control, dynamic=False)

        def plain():
            return run_base(x, t, context, context_mask=mask)

        def with_control():
            residuals = run_control(x, hint, t, context, context_mask=mask)
            return run_base(x, t, context, context_mask=mask, control={"input": residuals})

        with torch.inference_mode():
            plain_s = cuda_time(plain, repeat=args.repeat)
            control_s = cuda_time(with_control, repeat=args.repeat)
        emit({"bench": "sana_1600m_controlnet_step_b2", "mode": mode, "blocks": args.blocks, "resolution": 1024,
              "plain_s": round(plain_s, 5), "with_controlnet_s": round(control_s, 5),
              "overhead": round(control_s / plain_s, 3), "target": 1.4, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()

"""Checks a CPU's bf16 autocast conv weight gradient against fp32 (docs/benchmarks.md, "Small measurements").

    python benchmarks/bf16_conv_grad.py      prints, per input map side, how many of 200 trials were wrong
"""
from __future__ import annotations

import torch


def wrong_trials(side: int, trials: int = 200) -> int:
    """Trials where layer4's first conv (3x3, stride 2, 256 -> 512) gets a bf16 weight gradient > 1 off."""
    torch.manual_seed(0)
    wrong = 0
    for _ in range(trials):
        conv = torch.nn.Conv2d(256, 512, 3, stride=2, padding=1, bias=False)
        x = torch.randn(4, 256, side, side)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().sum().backward()
        exact = torch.nn.grad.conv2d_weight(x, conv.weight.shape, torch.ones(y.shape), stride=2, padding=1)
        got = conv.weight.grad
        wrong += int(not torch.isfinite(got).all() or (got - exact).abs().max().item() > 1.0)
    return wrong


if __name__ == "__main__":
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for side in (1, 2, 4):
        print(f"input {side}x{side}: {wrong_trials(side)} of 200 wrong")

"""Numerics of a run on a device: the autocast dtype (train.amp) and the memory layout (train.channels_last)."""
from __future__ import annotations

import torch

from artdist.config import JobConfig


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> autocast dtype (None = full fp32). auto: bf16/fp16 on GPUs, off on CPUs.

    CPUs without native bf16 run bf16 autocast many times slower than fp32 (docs/benchmarks.md),
    so auto never picks it there; an explicit bf16/fp16 is honoured anyway.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        # Without including_emulation=False, pre-Ampere GPUs (V100, T4) report bf16 and run it emulated.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def use_channels_last(cfg: JobConfig, device: torch.device) -> bool:
    """train.channels_last applies on CUDA only, where the convolutions run on tensor cores in NHWC."""
    return cfg.train.channels_last and device.type == "cuda"


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

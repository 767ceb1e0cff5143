"""Where a stage computes: the device, and whether bf16 is native there."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# What the training stages (MIL, SimCLR, tile-supervised) accept. fp16 would need loss scaling; bf16 has
# float32's range and needs none.
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere PyTorch emulates it, slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu; absent: no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def warn_if_bf16_emulated(device: torch.device, precision: str, setting: str) -> None:
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        logger.warning("%s is bf16, but this CPU has no bf16 units (AVX512-BF16 or AMX): PyTorch emulates bf16 "
                       "here, which is slower than fp32", setting)


def check_train_precision(value, setting: str) -> str:
    if value not in TRAIN_PRECISIONS:
        raise ValueError(f"{setting} must be one of {', '.join(TRAIN_PRECISIONS)}, got {value!r}")
    return value

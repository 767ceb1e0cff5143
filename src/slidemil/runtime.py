"""Where a stage computes: the device, and the one precision policy every stage follows.

The policy (``resolve_precision``), for ``auto``:

- CPU (and any device other than CUDA): exact float32. A CPU without bf16 units would only emulate bf16,
  slower; bf16 there is an explicit choice.
- CUDA, inference (feature extraction): fp16. No gradients, so no loss scaling; fp16 keeps three more
  mantissa bits than bf16, and it is what feature files extracted on CUDA have always held, so a cohort
  resumed with a newer slidemil does not mix fp16 and bf16 features.
- CUDA, training (MIL, tile-supervised, SimCLR): bf16 where the GPU computes it natively (Ampere and later);
  else (Pascal, Volta, Turing) fp16 with a GradScaler, since fp16 gradients underflow without loss scaling.
  Not fp32: fp16 runs on those GPUs' tensor cores (Volta, Turing) and halves activation memory, and the
  scaler makes it as safe to train in; not bf16, which they only emulate (``cuda_has_bf16``).

An explicit ``fp32``, ``bf16`` or ``fp16`` is taken as given; ``fp16`` in training comes with a scaler.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

# The settings each kind of stage accepts are named in slidemil.names (the config check needs them without torch);
# training's leave out fp16, which auto may still pick, with a scaler, on a GPU without bf16.
from slidemil.errors import DeviceError
from slidemil.names import FEATURE_PRECISIONS, TRAIN_PRECISIONS

logger = logging.getLogger(__name__)

STAGE_NEEDS = ("inference", "training")
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """What a stage computes in: ``name`` (fp32, fp16, bf16), the autocast dtype (None: no autocast) and
    whether training must scale its loss (a GradScaler)."""

    name: str
    dtype: torch.dtype | None
    scaler: bool = False

    def autocast(self, device: torch.device):
        """The autocast context of this precision on ``device`` (no context at all for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler, enabled only when this precision needs one (disabled, it passes the loss through)."""
        return torch.amp.GradScaler("cuda" if device.type == "cuda" else device.type, enabled=self.scaler)


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively (compute capability 8.0, Ampere, and later).

    Not ``torch.cuda.is_bf16_supported()`` alone: by default it also answers True where bf16 is only emulated
    (Volta, Turing: no bf16 tensor cores), where fp16 with a GradScaler is several times faster. Both must agree,
    so auto never picks bf16 where PyTorch says bf16 is unsupported. ROCm reports no CUDA capability; PyTorch
    says which AMD GPUs have bf16.
    """
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    native = torch.cuda.get_device_capability(device)[0] >= 8
    return native and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(device: torch.device, setting: str = "auto", need: str = "training",
                      has_bf16: Callable[[torch.device], bool] = cuda_has_bf16) -> Precision:
    """The precision a stage that ``need``s inference or training uses for ``setting`` on ``device``.

    The rule is in the module docstring. ``has_bf16`` tells whether a CUDA device computes bf16 natively;
    tests inject it, so the CUDA branch is checked without a GPU.
    """
    if need not in STAGE_NEEDS:
        raise ValueError(f"need must be one of {', '.join(STAGE_NEEDS)}, got {need!r}")
    if setting not in FEATURE_PRECISIONS:
        raise ValueError(f"unknown precision {setting!r}; use one of {', '.join(FEATURE_PRECISIONS)}")
    if setting == "auto":
        if device.type != "cuda":
            setting = "fp32"
        elif need == "inference":
            setting = "fp16"
        else:
            setting = "bf16" if has_bf16(device) else "fp16"
    return Precision(setting, _DTYPES[setting], scaler=setting == "fp16" and need == "training")


def resolve_device(device: str = "auto") -> torch.device:
    """The device a job computes on; a CUDA device this machine lacks is a DeviceError (one line).

    Checked here, at job start, not in the config check: the workflow is often planned on a machine without
    a GPU (a login node) for jobs that run on GPU nodes.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise DeviceError(f"compute.device {device!r} is not a device ({err}); use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus <= (dev.index or 0):
            raise DeviceError(f"compute.device is {device!r} but this machine has {n_gpus or 'no'} CUDA GPU(s) "
                              "visible to PyTorch; run the job on a GPU node or set compute.device: auto")
    return dev


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

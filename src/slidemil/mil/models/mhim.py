"""MHIM-MIL (Tang et al. 2023): a teacher-student wrapper around an attention MIL model.

``mhim_<base>`` holds two copies of ``<base>`` (built with ``base_kwargs``):

- the teacher, initialised from the baseline ``<base>`` trained first on the
  same fold (``init_from_checkpoint``), never receives gradients, always runs
  in eval mode on the full bag and gives the instance attention;
- the student, trained on the bag with the mined instances removed. Its
  projection (``init_student: projection``, the paper and the authors' runs)
  or all its weights (``full``) start from the baseline; ``none`` starts it
  from scratch.

Training (``training_step`` / ``after_optimizer_step``, the hooks the
training loop calls when a model has them): loss = class-weighted CE of the
student + alpha * CE(softmax(teacher embedding / temp_t), log_softmax(student
embedding / temp_s)); after every optimiser step teacher = m teacher +
(1 - m) student, m fixed or cosine-scheduled to 1.0 (``momentum_schedule``);
the high-attention ratio decays to 0 with a cosine over all training steps
(``mask_ratio_h_decay``). ``forward`` (validation, checkpoint selection,
predictions) runs the student, as the paper and the authors' code evaluate
it; ``evaluate: teacher`` runs the teacher instead.

``preset`` fills the ratios, alpha and the momentum schedule with the
published settings (METHODS section 5; authors' README for mask_ratio_hr and
the momentum schedule); settings given explicitly win.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slidemil.mil.models import mhim_blocks as mhim
from slidemil.names import MHIM_BASES, MHIM_PRESETS, mhim_name
from slidemil.mil.models import _REGISTRY, create_model, model_kwargs_defaults, register_model

PRESET_KEYS = ("mask_ratio_r", "mask_ratio_l", "mask_ratio_h", "mask_ratio_hr", "alpha", "momentum_schedule")
# Without a preset: no masking, as the authors' code defaults.
NO_PRESET = {"mask_ratio_r": 0.0, "mask_ratio_l": 0.0, "mask_ratio_h": 0.0, "mask_ratio_hr": 1.0,
             "alpha": 0.0, "momentum_schedule": False}


def resolve_settings(base: str, preset: str | None, explicit: dict) -> dict:
    values = dict(NO_PRESET if preset is None else MHIM_PRESETS[preset][base])
    values.update({k: v for k, v in explicit.items() if v is not None})
    return values


class MHIM(nn.Module):
    needs_init_checkpoint = True

    def __init__(self, base: str, in_dim: int, n_classes: int, base_kwargs: dict, settings: dict,
                 mask_ratio_h_decay: bool, mask_attention: str, temp_t: float, temp_s: float,
                 momentum: float, init_student: str, evaluate: str):
        super().__init__()
        # The settings' values were checked by create_model (slidemil.config.check_model_settings).
        self.base, self.name = base, mhim_name(base)
        self.base_kwargs = {**model_kwargs_defaults(base), **(base_kwargs or {})}
        self.settings = settings
        self.mask_ratio_h_decay = mask_ratio_h_decay
        self.mask_attention = mask_attention
        self.temp_t, self.temp_s, self.momentum = temp_t, temp_s, momentum
        self.init_student, self.evaluate = init_student, evaluate
        self.student = create_model(base, in_dim=in_dim, n_classes=n_classes, **(base_kwargs or {}))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.initialised = False
        self.last_step: dict = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout (Algorithm 1: f_t.eval())
        return self

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        return (self.student if self.evaluate == "student" else self.teacher)(x, mask)

    # ---- hooks the training loop calls ---------------------------------------

    def init_from_checkpoint(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Teacher = the baseline; student's projection (or everything) too."""
        if checkpoint.get("model") != self.base:
            raise ValueError(f"{source}: {self.name} needs a {self.base!r} checkpoint, got {checkpoint.get('model')!r}")
        saved = {**model_kwargs_defaults(self.base), **(checkpoint.get("model_kwargs") or {})}
        if saved != self.base_kwargs:
            raise ValueError(
                f"{source}: the baseline was trained with {self.base} settings {saved}, "
                f"but {self.name} was given base_kwargs {self.base_kwargs}"
            )
        self.teacher.load_state_dict(checkpoint["state_dict"])
        if self.init_student == "full":
            self.student.load_state_dict(checkpoint["state_dict"])
        elif self.init_student == "projection":
            self.student.project.load_state_dict(self.teacher.project.state_dict())
        self.initialised = True

    def training_step(self, x, mask, y, loss_fn, step: int, total_steps: int) -> torch.Tensor:
        if not self.initialised:
            raise RuntimeError(f"{self.name}: init_from_checkpoint must be called before training")
        real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        with torch.no_grad():
            teacher = self.teacher(x, None if bool(real.all()) else real)
        scores = teacher.get("head_attention") if self.mask_attention != "mean" else None
        scores = teacher["attention"] if scores is None else scores
        if scores is None:
            raise ValueError(f"{self.name}: the base model {self.base!r} gives no instance attention to mine from")
        ratio_h = self.settings["mask_ratio_h"]
        if self.mask_ratio_h_decay:
            ratio_h = mhim.cosine(ratio_h, 0.0, step, total_steps)
        masked = mhim.select_masked(
            scores, real, self.settings["mask_ratio_r"], self.settings["mask_ratio_l"], ratio_h,
            self.settings["mask_ratio_hr"], self.mask_attention,
        )
        x_s, mask_s = mhim.compact(x, real & ~masked)
        student = self.student(x_s, None if bool(mask_s.all()) else mask_s)
        loss_cls = loss_fn(student["logits"], y)
        loss_con = mhim.consistency_loss(student["embedding"], teacher["embedding"], self.temp_t, self.temp_s)
        self.last_step = {"ratio_h": ratio_h, "kept": int(mask_s.sum()), "total": int(real.sum()),
                          "loss_cls": loss_cls.item(), "loss_con": loss_con.item()}
        return loss_cls + self.settings["alpha"] * loss_con

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = mhim.cosine(self.momentum, 1.0, step, total_steps) if self.settings["momentum_schedule"] else self.momentum
        mhim.ema_update(self.teacher, self.student, m)


def _register(base: str) -> None:
    name = mhim_name(base)

    def build(
        in_dim: int,
        n_classes: int = 2,
        base_kwargs: dict | None = None,
        preset: str | None = "camelyon16",
        mask_ratio_r: float | None = None,
        mask_ratio_l: float | None = None,
        mask_ratio_h: float | None = None,
        mask_ratio_hr: float | None = None,
        alpha: float | None = None,
        momentum_schedule: bool | None = None,
        mask_ratio_h_decay: bool = True,
        mask_attention: str = "vote",
        temp_t: float = 0.1,
        temp_s: float = 1.0,
        momentum: float = 0.9999,
        init_student: str = "projection",
        evaluate: str = "student",
    ) -> MHIM:
        explicit = {"mask_ratio_r": mask_ratio_r, "mask_ratio_l": mask_ratio_l, "mask_ratio_h": mask_ratio_h,
                    "mask_ratio_hr": mask_ratio_hr, "alpha": alpha, "momentum_schedule": momentum_schedule}
        settings = resolve_settings(base, preset, explicit)
        return MHIM(base, in_dim, n_classes, dict(base_kwargs or {}), settings, mask_ratio_h_decay,
                    mask_attention, temp_t, temp_s, momentum, init_student, evaluate)

    build.__name__ = name
    build.__doc__ = f"MHIM-MIL on {base} (see slidemil.mil.models.mhim)."
    register_model(name)(build)


for _base in MHIM_BASES:
    if _base in _REGISTRY:
        _register(_base)

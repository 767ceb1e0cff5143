"""Endpoints: what each ``task`` means for training and evaluation, in one place.

A task owns the output head's size, the targets and loss, how a slide's outputs are written and averaged into a
patient's, the validation metric that selects the checkpoint, the metrics the report shows, and how an attention
heatmap draws and titles its test slides (``heatmap_groups``, ``heatmap_label``, ``bag_summary``):

============  ===========  ==================================  ===============  ==============================
task          head         loss                                slide output     metrics (patient level)
============  ===========  ==================================  ===============  ==============================
binary        2 logits     class-weighted cross-entropy        prob (class 1)   AUC (selection)
multiclass    K logits     class-weighted cross-entropy        prob_0..prob_K-1 macro one-vs-rest AUC
                                                                                (selection), balanced accuracy,
                                                                                per-class AUC
survival      4 logits     discrete-time negative log-         risk             Harrell's C-index (selection)
                           likelihood (Zadeh and Schmid 2020)
regression    1 output     MSE on the target standardised      pred             R^2 (selection), Pearson r, MAE
                           with the training slides' mean/std
============  ===========  ==================================  ===============  ==============================

Survival: the time axis is cut at the quartiles of the training slides' event times (4 bins); the model gives a
hazard per bin, h_k = sigmoid(logit_k), S_k = prod_{j<=k} (1 - h_j); an event in bin y costs
-log S_{y-1} - log h_y, a patient censored in bin y costs -log S_y (Zadeh and Schmid 2020, "Bias in
cross-entropy-based training of deep survival networks", as Patch-GCN, MCAT and Patho-Bench use it, there with
alpha = 0). It needs no other patient in the batch (unlike the Cox partial likelihood), so it trains at batch
size 1. A slide's risk is -sum_k S_k: higher risk, shorter expected survival.

A patient's outputs are the mean of its slides' (mean class probabilities, mean risk, mean prediction). The
binary task is the pipeline's original behaviour, unchanged, through the functions of ``slidemil.training``.
This module imports torch only inside the training-side methods: the report uses its metrics without torch.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score

from slidemil.names import BINARY, PRIMARY_METRICS, TASKS

SURVIVAL_BINS = 4
# Discrete-time likelihood terms are clamped away from log(0).
_EPS = 1e-7


def class_order(values) -> list[str]:
    """The class names of a multiclass label in index order: numbers numerically, names alphabetically."""
    distinct = pd.Series(values).dropna().astype(str).unique().tolist()
    numeric = pd.to_numeric(pd.Series(distinct), errors="coerce")
    if numeric.notna().all():
        return [d for _, d in sorted(zip(numeric, distinct))]
    return sorted(distinct)


# --------------------------------------------------------------------------- metrics (no torch)


def macro_auc(labels, probs: np.ndarray) -> float | None:
    """Unweighted mean of the one-vs-rest AUCs of the classes present with both outcomes (None: none is).

    With every class present this is scikit-learn's ``roc_auc_score(multi_class="ovr", average="macro")``.
    """
    aucs = [a for a in per_class_auc(labels, probs) if a is not None]
    return float(np.mean(aucs)) if aucs else None


def per_class_auc(labels, probs: np.ndarray) -> list[float | None]:
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs)
    out = []
    for k in range(probs.shape[1]):
        positive = labels == k
        out.append(float(roc_auc_score(positive, probs[:, k])) if 0 < positive.sum() < len(labels) else None)
    return out


def c_index(time, risk, event) -> float | None:
    """Harrell's C-index of ``risk`` (higher = earlier event), lifelines' implementation; None without a
    comparable pair."""
    from lifelines.utils import concordance_index

    time, risk, event = (np.asarray(v, dtype=float) for v in (time, risk, event))
    if not (event == 1).any() or len(time) < 2:
        return None
    try:
        return float(concordance_index(time, -risk, event))
    except ZeroDivisionError:  # lifelines: "no admissable pairs"
        return None


def pearson_r(y, pred) -> float | None:
    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    if len(y) < 2 or y.std() == 0 or pred.std() == 0:
        return None
    return float(np.corrcoef(y, pred)[0, 1])


def _none_if_nan(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------- tasks


class Task:
    """The binary task, and the interface of the others. Subclasses override what differs."""

    name = BINARY
    metric = PRIMARY_METRICS[BINARY]  # the validation metric that selects the checkpoint (higher is better)
    extra_columns: tuple[str, ...] = ()  # split columns that predictions keep (survival: time)

    def __init__(self, class_names: list | None = None, class_weighted: bool = True):
        self.class_names = list(class_names) if class_names is not None else None
        self.class_weighted = class_weighted
        self.weights = None

    # ---- shapes and columns
    @property
    def head_size(self) -> int:
        from slidemil.training import N_CLASSES

        return N_CLASSES

    @property
    def output_columns(self) -> list[str]:
        return ["prob"]

    @property
    def history_column(self) -> str:
        return f"val_{self.metric}"

    # ---- training
    def fit(self, train: pd.DataFrame) -> None:
        """Learn what the loss needs from the training slides (slide_id, label[, time]): class weights here."""
        from slidemil.training import class_weights

        self.weights = class_weights(train["label"].to_numpy().astype(int), self.class_weighted,
                                     n_classes=self.head_size)

    def targets(self, rows: pd.DataFrame) -> dict:
        return dict(zip(rows["slide_id"], rows["label"].astype(int)))

    def collate(self, values: list):
        import torch

        return torch.tensor(values, dtype=torch.long)

    def to(self, device) -> Task:
        if self.weights is not None:
            self.weights = self.weights.to(device)
        return self

    def loss(self, logits, y, reduction: str = "mean"):
        from slidemil.training import weighted_loss

        return weighted_loss(logits, y, self.weights, reduction=reduction)

    def outputs(self, logits) -> np.ndarray:
        """Slide outputs [B, len(output_columns)] from the logits."""
        import torch

        return torch.softmax(logits.float(), dim=1)[:, 1:2].cpu().numpy()

    # ---- evaluation
    def can_select(self, val: pd.DataFrame) -> bool:
        from slidemil.training import validation_has_both_classes

        return validation_has_both_classes(val)

    def score(self, slides: pd.DataFrame) -> float | None:
        """The validation metric of slides with outputs (patient level)."""
        from slidemil.training import patient_auc

        return patient_auc(slides)

    def patients(self, slides: pd.DataFrame) -> pd.DataFrame:
        from slidemil.training import patient_predictions

        return patient_predictions(slides)

    def state(self) -> dict:
        """What the checkpoint records of the task (plain values: model.pt loads with weights_only)."""
        return {"task": self.name, "class_names": self.class_names}

    def load_state(self, ckpt: dict) -> None:
        """Take back what :meth:`state` recorded beyond the name and classes (what outputs need)."""

    # ---- heatmaps (slidemil.report.model_heatmaps, slidemil.report.heatmap): which test slides, how titled
    heatmap_pick = "alternating positive and negative"

    def heatmap_groups(self, rows: pd.DataFrame) -> tuple[pd.Series, tuple]:
        """Each slide's group (``rows``: splits rows) and the groups' order; heatmap picks cycle through them."""
        return pd.to_numeric(rows["label"], errors="coerce"), (1, 0)

    def heatmap_label(self, row: pd.Series):
        """The true label as a heatmap's title and index give it."""
        return int(row["label"])

    def bag_summary(self, outputs: np.ndarray) -> tuple[float, str]:
        """A bag's score (from its row of :meth:`outputs`) and the words a heatmap title says it in."""
        prob = float(outputs[0])
        return prob, f"P(positive) {prob:.3f}"


class Multiclass(Task):
    name = "multiclass"
    metric = PRIMARY_METRICS["multiclass"]

    @property
    def head_size(self) -> int:
        return len(self.class_names)

    @property
    def output_columns(self) -> list[str]:
        return [f"prob_{k}" for k in range(self.head_size)]

    def outputs(self, logits) -> np.ndarray:
        import torch

        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def can_select(self, val: pd.DataFrame) -> bool:
        return val.groupby("patient_id")["label"].first().nunique() >= 2

    def score(self, slides: pd.DataFrame) -> float | None:
        patients = self.patients(slides)
        return macro_auc(patients["label"], patients[self.output_columns].to_numpy())

    def patients(self, slides: pd.DataFrame) -> pd.DataFrame:
        return mean_per_patient(slides, self.output_columns)

    def metrics(self, patients: pd.DataFrame) -> dict[str, float | None]:
        probs = patients[self.output_columns].to_numpy()
        labels = patients["label"].to_numpy().astype(int)
        with warnings.catch_warnings():  # a resample without some class: its recall is left out, as it should
            warnings.simplefilter("ignore", UserWarning)
            balanced = float(balanced_accuracy_score(labels, probs.argmax(1))) if len(labels) else None
        out = {"macro_auc": macro_auc(labels, probs), "balanced_accuracy": balanced}
        for name, auc in zip(self.class_names, per_class_auc(labels, probs)):
            out[f"auc_{name}"] = auc
        return out

    heatmap_pick = "cycling through the true classes"

    def heatmap_groups(self, rows: pd.DataFrame) -> tuple[pd.Series, tuple]:
        return pd.to_numeric(rows["label"], errors="coerce"), tuple(range(self.head_size))

    def heatmap_label(self, row: pd.Series):
        return self.class_names[int(row["label"])]

    def bag_summary(self, outputs: np.ndarray) -> tuple[float, str]:
        """The predicted class's probability; the words name the class."""
        k = int(np.argmax(outputs))
        return float(outputs[k]), f"predicted {self.class_names[k]} (P {float(outputs[k]):.3f})"


class Regression(Task):
    name = "regression"
    metric = PRIMARY_METRICS["regression"]

    def __init__(self, class_names=None, class_weighted: bool = True):
        super().__init__(None, class_weighted)
        self.mean, self.std = 0.0, 1.0

    @property
    def head_size(self) -> int:
        return 1

    @property
    def output_columns(self) -> list[str]:
        return ["pred"]

    def fit(self, train: pd.DataFrame) -> None:
        y = train["label"].to_numpy(dtype=float)
        # Standardised with the training slides' statistics, so the loss scale does not depend on the unit.
        self.mean, self.std = float(y.mean()), float(y.std()) if y.std() > 0 else 1.0

    def targets(self, rows: pd.DataFrame) -> dict:
        return dict(zip(rows["slide_id"], (rows["label"].astype(float) - self.mean) / self.std))

    def collate(self, values: list):
        import torch

        return torch.tensor(values, dtype=torch.float32)

    def loss(self, logits, y, reduction: str = "mean"):
        import torch.nn.functional as F

        return F.mse_loss(logits.float()[:, 0], y, reduction=reduction)

    def outputs(self, logits) -> np.ndarray:
        return (logits.float()[:, :1] * self.std + self.mean).cpu().numpy()

    def can_select(self, val: pd.DataFrame) -> bool:
        return val.groupby("patient_id")["label"].first().nunique() >= 2

    def score(self, slides: pd.DataFrame) -> float | None:
        patients = self.patients(slides)
        return _none_if_nan(r2_score(patients["label"], patients["pred"])) if len(patients) > 1 else None

    def patients(self, slides: pd.DataFrame) -> pd.DataFrame:
        return mean_per_patient(slides, self.output_columns)

    def metrics(self, patients: pd.DataFrame) -> dict[str, float | None]:
        y, pred = patients["label"].to_numpy(float), patients["pred"].to_numpy(float)
        enough = len(y) > 1
        return {"r2": _none_if_nan(r2_score(y, pred)) if enough else None, "pearson_r": pearson_r(y, pred),
                "mae": float(mean_absolute_error(y, pred)) if len(y) else None}

    def state(self) -> dict:
        return {**super().state(), "target_mean": self.mean, "target_std": self.std}

    def load_state(self, ckpt: dict) -> None:
        self.mean, self.std = float(ckpt["target_mean"]), float(ckpt["target_std"])

    heatmap_pick = "alternating targets above and below the median of the fold's test slides"

    def heatmap_groups(self, rows: pd.DataFrame) -> tuple[pd.Series, tuple]:
        y = pd.to_numeric(rows["label"], errors="coerce")
        return (y > y.median()).astype(int), (1, 0)

    def heatmap_label(self, row: pd.Series):
        return float(row["label"])

    def bag_summary(self, outputs: np.ndarray) -> tuple[float, str]:
        """The prediction, in the target's units."""
        pred = float(outputs[0])
        return pred, f"predicted {pred:.4g}"


class Survival(Task):
    name = "survival"
    metric = PRIMARY_METRICS["survival"]
    extra_columns = ("time",)

    def __init__(self, class_names=None, class_weighted: bool = True):
        super().__init__(None, class_weighted)
        self.cuts: list[float] = []

    @property
    def head_size(self) -> int:
        return SURVIVAL_BINS

    @property
    def output_columns(self) -> list[str]:
        return ["risk"]

    def fit(self, train: pd.DataFrame) -> None:
        events = train.loc[train["label"].astype(int) == 1, "time"].to_numpy(dtype=float)
        if len(events) == 0:
            raise ValueError("survival: the training slides hold no event; the time bins need event times")
        self.cuts = [float(q) for q in np.quantile(events, np.arange(1, SURVIVAL_BINS) / SURVIVAL_BINS)]

    def targets(self, rows: pd.DataFrame) -> dict:
        bins = np.searchsorted(self.cuts, rows["time"].to_numpy(dtype=float), side="right")
        return dict(zip(rows["slide_id"], zip(bins.astype(float), rows["label"].astype(float))))

    def collate(self, values: list):
        import torch

        return torch.tensor(values, dtype=torch.float32).reshape(-1, 2)

    def loss(self, logits, y, reduction: str = "mean"):
        losses = discrete_time_nll(logits, y[:, 0].long(), y[:, 1])
        return losses.mean() if reduction == "mean" else losses.sum()

    def outputs(self, logits) -> np.ndarray:
        import torch

        survival = torch.cumprod(1 - torch.sigmoid(logits.float()), dim=1)
        return (-survival.sum(dim=1, keepdim=True)).cpu().numpy()

    def can_select(self, val: pd.DataFrame) -> bool:
        """Whether the C-index is defined: an event before some other patient's time (a comparable pair)."""
        first = val.groupby("patient_id")[["label", "time"]].first()
        events = first.loc[first["label"] == 1, "time"]
        return bool((events < first["time"].max()).any())

    def score(self, slides: pd.DataFrame) -> float | None:
        patients = self.patients(slides)
        return c_index(patients["time"], patients["risk"], patients["label"])

    def patients(self, slides: pd.DataFrame) -> pd.DataFrame:
        return mean_per_patient(slides, self.output_columns, first=("label", "time"))

    def metrics(self, patients: pd.DataFrame) -> dict[str, float | None]:
        return {"c_index": c_index(patients["time"], patients["risk"], patients["label"])}

    def state(self) -> dict:
        return {**super().state(), "time_cuts": self.cuts}

    def load_state(self, ckpt: dict) -> None:
        self.cuts = [float(c) for c in ckpt["time_cuts"]]

    heatmap_pick = "alternating patients with an event and censored ones"

    def heatmap_label(self, row: pd.Series):
        return f"{'event' if int(row['label']) == 1 else 'censored'} at {float(row['time']):g}"

    def bag_summary(self, outputs: np.ndarray) -> tuple[float, str]:
        """The risk, -sum_k S_k, between -SURVIVAL_BINS and 0."""
        risk = float(outputs[0])
        return risk, f"risk {risk:.3f} (-{SURVIVAL_BINS} to 0, higher: earlier event)"


def discrete_time_nll(logits, bins, events):
    """Per-bag discrete-time survival NLL (Zadeh and Schmid 2020; Patch-GCN's NLLSurvLoss with alpha 0).

    ``logits`` [B, K] hazard logits, ``bins`` [B] the bin of each follow-up time, ``events`` [B] 1 = event.
    """
    import torch

    hazards = torch.sigmoid(logits.float())
    survival = torch.cumprod(1 - hazards, dim=1)
    padded = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)  # S_{-1} = 1
    bins = bins.view(-1, 1)
    before = padded.gather(1, bins).clamp_min(_EPS)          # survived the bins before y
    in_bin = hazards.gather(1, bins).clamp_min(_EPS)         # the event in bin y
    through = padded.gather(1, bins + 1).clamp_min(_EPS)     # survived bin y too (censored)
    events = events.view(-1, 1).float()
    return (-events * (before.log() + in_bin.log()) - (1 - events) * through.log()).squeeze(1)


def mean_per_patient(slides: pd.DataFrame, columns: list[str], first: tuple[str, ...] = ("label",)) -> pd.DataFrame:
    """A patient's outputs: the mean of its slides' (``columns``); ``first`` taken as they are."""
    grouped = slides.groupby(["partition", "patient_id"], sort=False)
    spec = {c: (c, "first") for c in first} | {"n_slides": ("slide_id", "size")} | {c: (c, "mean") for c in columns}
    patients = grouped.agg(**spec).reset_index()
    return patients[["patient_id", *first, "partition", "n_slides", *columns]]


_TASKS = {BINARY: Task, "multiclass": Multiclass, "survival": Survival, "regression": Regression}
assert tuple(_TASKS) == TASKS


def make_task(name: str = BINARY, class_names: list | None = None, class_weighted: bool = True) -> Task:
    """The task ``name`` (one of slidemil.names.TASKS); multiclass needs its ``class_names`` in index order."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if name == "multiclass" and not class_names:
        raise ValueError("task multiclass needs its class names")
    return _TASKS[name](class_names, class_weighted)


def task_from_checkpoint(ckpt: dict) -> Task:
    """The task a training checkpoint was trained for, with what its outputs need (target scale, time cuts)."""
    task = make_task(ckpt.get("task") or BINARY, ckpt.get("class_names"))
    task.load_state(ckpt)
    return task

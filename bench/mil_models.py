"""Seconds per training epoch and peak memory of every registered MIL model on the same synthetic bags.

    python bench/mil_models.py                                  # 64 bags x 2000 tiles x 1024, all models
    python bench/mil_models.py --bags 32 --tiles 2000 --models abmil mhim_abmil transmil mhim_transmil
    python bench/mil_models.py --bags 270 --tiles 9000 --device cuda     # CAMELYON-16 scale (about 5 GB of float16)
    python bench/mil_models.py --bags 27 --tiles 9000 --precision fp32 bf16    # training.precision side by side

The bags are drawn once from the seed and kept in memory in ``--dtype``
(float16 by default, as the training stage keeps float16 features) and
converted to float32 and standardised per batch on the device, exactly as
``slidemil.mil.train`` does. Each model runs one untimed warm-up pass over a few bags, then
``--epochs`` timed epochs of ``slidemil.mil.train.train_epoch`` (Adam, cosine
schedule, class-weighted CE, batch size 1 as in MHIM-MIL). Epochs are
interleaved across models and the median epoch is reported, so that load from
other processes hits every model alike. MHIM models start from an untrained
copy of their base model (its attention is then nearly flat, which costs the
same).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during an epoch above
what was allocated before it; on CPU the peak resident set size during an
epoch above its size before it, sampled every 2 ms (tracemalloc does not see
PyTorch's allocator). The last column is an MHIM model's time per epoch
divided by its base model's (the target is <= 1.3). With several
``--precision`` values every model runs under each (``training.precision``),
and the last column is the model's time per epoch under the first precision
divided by its time under this one (above 1: faster).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidemil.runtime import TRAIN_PRECISIONS, resolve_device  # noqa: E402
from slidemil.mil.models import create_model, list_models  # noqa: E402
from slidemil.names import base_model  # noqa: E402
from slidemil.mil.train import Data, feature_stats, train_epoch  # noqa: E402
from slidemil.tasks import make_task  # noqa: E402
from slidemil.training import Stepper  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def make_bags(n_bags: int, n_tiles: int, dim: int, dtype: torch.dtype, seed: int):
    """Seeded bags [n_tiles, dim]; positive bags carry a few shifted 'tumour' tiles."""
    g = torch.Generator().manual_seed(seed)
    bags, labels = {}, {}
    for i in range(n_bags):
        label = i % 2
        bag = torch.randn(n_tiles, dim, generator=g)
        if label:
            hot = torch.randperm(n_tiles, generator=g)[: max(1, n_tiles // 20)]
            bag[hot, : dim // 8] += 1.5
        bags[f"bag{i:04d}"] = bag.to(dtype)
        labels[f"bag{i:04d}"] = label
    return bags, labels


class RssPeak:
    """Peak resident set size (bytes) above the size at start, sampled in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.start)


def build(name: str, dim: int, seed: int):
    torch.manual_seed(seed)
    model = create_model(name, in_dim=dim)
    if getattr(model, "needs_init_checkpoint", False):
        base = create_model(model.base, in_dim=dim)
        model.init_from_checkpoint({"model": model.base, "model_kwargs": {}, "state_dict": base.state_dict()})
    return model


def release_memory() -> None:
    """Hand freed heap back to the OS so that each model's RSS peak starts from a clean slate."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class Run:
    """One model's training state, so that the models' epochs can be interleaved."""

    def __init__(self, name: str, data: Data, ids: list[str], args):
        self.name, self.data, self.ids, self.args = name, data, ids, args
        self.model = build(name, args.dim, args.seed).to(data.device)
        self.params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=2e-4, weight_decay=1e-5)
        self.steps = math.ceil(len(ids) / args.batch_size)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.steps * (args.epochs + 1))
        self.stepper = Stepper(self.optimizer, data.amp.grad_scaler(data.device), self.scheduler)
        self.rng = np.random.default_rng(args.seed)
        self.times, self.peak = [], 0
        warm = ids[: min(len(ids), 4 * args.batch_size)]
        self._epoch(warm, step=0)

    def _epoch(self, ids, step):
        train_epoch(self.model, self.data, ids, self.args.batch_size, self.stepper, self.rng,
                    step=step, total_steps=self.steps * self.args.epochs)

    def epoch(self, k: int) -> None:
        dev = self.data.device
        cuda = dev.type == "cuda"
        release_memory()
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
        with RssPeak() as rss:
            t0 = time.perf_counter()
            self._epoch(self.ids, step=k * self.steps)
            if cuda:
                torch.cuda.synchronize(dev)
            self.times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(dev) - before if cuda else rss.peak
        self.peak = max(self.peak, peak)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=64)
    parser.add_argument("--tiles", type=int, default=2000, help="tiles per bag")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model (median reported)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="in-memory feature precision")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--precision", nargs="+", choices=TRAIN_PRECISIONS, default=["auto"],
                        help="training.precision; several: every model under each, side by side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    names = args.models or list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")

    t0 = time.perf_counter()
    bags, labels = make_bags(args.bags, args.tiles, args.dim, getattr(torch, args.dtype), args.seed)
    ids = sorted(bags)
    task = make_task()
    task.fit(pd.DataFrame({"slide_id": ids, "label": [labels[s] for s in ids]}))
    data = Data(bags, labels, task.to(dev), dev, feature_stats(bags, ids))
    gib = sum(b.numel() * b.element_size() for b in bags.values()) / 2**30
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# {args.bags} bags x {args.tiles} tiles x {args.dim} ({args.dtype}, {gib:.2f} GiB in memory, "
          f"made in {time.perf_counter() - t0:.1f} s); device {name}; batch {args.batch_size}; "
          f"{args.epochs} timed epoch(s) per model; torch {torch.__version__}")

    # Epochs interleaved across models (model A epoch 1, model B epoch 1, ...): on a shared
    # machine a slow spell then slows every model alike instead of whichever ran during it.
    runs = [Run(n, dataclasses.replace(data, precision=p), ids, args) for n in names for p in args.precision]
    for k in range(args.epochs):
        for run in runs:
            run.epoch(k)
            print(f"  epoch {k + 1} {run.name} ({run.data.precision}): {run.times[-1]:.2f} s", file=sys.stderr, flush=True)
    rows = [{"model": r.name, "precision": r.data.precision, "params": r.params, "s_per_epoch": float(np.median(r.times)),
             "peak_mb": r.peak / 2**20} for r in runs]
    by_key = {(r["model"], r["precision"]): r for r in rows}
    print(f"| model | precision | trainable params | s / epoch | peak MB "
          f"({'CUDA allocated' if dev.type == 'cuda' else 'RSS delta'}) | MHIM / base | {args.precision[0]} / this |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mhim = speedup = ""
        base = base_model(r["model"])
        if (base, r["precision"]) in by_key:
            mhim = f"{r['s_per_epoch'] / by_key[base, r['precision']]['s_per_epoch']:.2f}"
        if r["precision"] != args.precision[0]:
            speedup = f"{by_key[r['model'], args.precision[0]]['s_per_epoch'] / r['s_per_epoch']:.2f}"
        print(f"| {r['model']} | {r['precision']} | {r['params']:,} | {r['s_per_epoch']:.3f} | {r['peak_mb']:.0f} "
              f"| {mhim} | {speedup} |")


if __name__ == "__main__":
    main()

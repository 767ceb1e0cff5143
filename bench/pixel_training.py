"""Seconds per training step of the stages that train on pixels (SimCLR, tile-supervised), per precision.

    python bench/pixel_training.py                                        # every arch, auto vs bf16, CPU
    python bench/pixel_training.py --stages simclr --archs resnet18 --precision fp32 bf16 --batch-size 64
    python bench/pixel_training.py --device cuda --batch-size 256 --input-px 224

One step is what the stage does per batch, on random tiles already on the device:
normalise, forward under the stage's own autocast (``simclr.precision`` or the
tile-supervised ``precision``), loss (NT-Xent over both views, or the
class-weighted cross-entropy), backward, Adam. SimCLR runs ``2 x batch``
images per step (two views per tile). The loader is left out: it is measured by
``bench/extraction.py --loader``. Steps are interleaved across the cases
(case A step 1, case B step 1, ...), the first ``--warmup`` steps of each are
dropped, and the median step is reported. The last column is the step time
under the first ``--precision`` divided by that under this one (above 1: faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slidemil.pretrain import simclr, tile_supervised  # noqa: E402
from slidemil.runtime import TRAIN_PRECISIONS, cpu_has_bf16, resolve_device, resolve_precision  # noqa: E402
from slidemil.pretrain.tilepool import normalizer  # noqa: E402
from slidemil.training import weighted_loss  # noqa: E402

STAGES = {"simclr": simclr.ARCHITECTURES, "tile_supervised": tile_supervised.ARCHITECTURES}


class Case:
    def __init__(self, stage: str, arch: str, precision: str, dev: torch.device, args):
        self.stage, self.arch, self.precision, self.dev = stage, arch, precision, dev
        torch.manual_seed(args.seed)
        amp = resolve_precision(dev, precision, need="training")  # both stages follow the runtime policy
        self.autocast = lambda: amp.autocast(dev)
        self.scaler = amp.grad_scaler(dev)
        if stage == "simclr":
            self.model = simclr.SimCLRModel(arch, args.proj_dim)
            self.images = 2 * args.batch_size
        else:
            self.model = tile_supervised.TileClassifier(arch, "random", args.seed)
            self.images = args.batch_size
            self.labels = torch.arange(args.batch_size, device=dev) % 2
            self.weights = torch.ones(2, device=dev)
        self.model = self.model.to(dev, memory_format=torch.channels_last).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(args.seed)
        self.tiles = torch.randint(0, 256, (self.images, 3, args.input_px, args.input_px), dtype=torch.uint8,
                                   generator=g).to(dev)
        self.normalize = normalizer(dev)
        self.proj_dim = args.proj_dim
        self.times: list[float] = []

    def step(self) -> None:
        t0 = time.perf_counter()
        x = self.normalize(self.tiles)
        with self.autocast():
            out = self.model(x)
        if self.stage == "simclr":
            z = out.view(-1, 2, self.proj_dim)
            loss = simclr.nt_xent(z[:, 0], z[:, 1])
        else:
            loss = weighted_loss(out, self.labels, self.weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.times.append(time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=sorted(STAGES))
    parser.add_argument("--archs", nargs="+", default=None, help="default: every arch of each stage")
    parser.add_argument("--precision", nargs="+", choices=TRAIN_PRECISIONS, default=["auto", "bf16"])
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per step (SimCLR: 2 views each)")
    parser.add_argument("--input-px", type=int, default=128)
    parser.add_argument("--proj-dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cases = []
    for stage in args.stages:
        archs = [a for a in (args.archs or STAGES[stage]) if a in STAGES[stage]]
        cases += [Case(stage, a, p, dev, args) for a in archs for p in args.precision]
    if not cases:
        parser.error(f"no arch of {', '.join(args.stages)} among {', '.join(args.archs)}")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads, bf16 units: {'yes' if cpu_has_bf16() else 'no'}")
    print(f"# device {name}; batch {args.batch_size} tiles of {args.input_px} px; {args.warmup} warm-up + "
          f"{args.steps} timed steps per case, interleaved; torch {torch.__version__}")
    for k in range(args.warmup + args.steps):
        for case in cases:
            case.step()
            print(f"  step {k + 1} {case.stage} {case.arch} ({case.precision}): {case.times[-1]:.3f} s",
                  file=sys.stderr, flush=True)
    first = {(c.stage, c.arch): c for c in cases if c.precision == args.precision[0]}
    print(f"| stage | arch | precision | s / step | images / s | {args.precision[0]} / this |")
    print("|---|---|---|---:|---:|---:|")
    for c in cases:
        s = float(np.median(c.times[args.warmup:]))
        base = float(np.median(first[(c.stage, c.arch)].times[args.warmup:]))
        print(f"| {c.stage} | {c.arch} | {c.precision} | {s:.3f} | {c.images / s:.0f} | {base / s:.2f} |")


if __name__ == "__main__":
    main()

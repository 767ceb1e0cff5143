"""Feature extraction end to end against the model alone, side by side.

For each extractor and loader setting it times, interleaved (A, B, C, A, B, C, ...), each
run in a fresh process as a feature job is (forking loader workers from a process that
already ran other cases proved fragile):
- ``model``: the same model, batch size, precision and channels-last layout on random
  uint8 batches already in memory (normalisation on the device included): the ceiling;
- ``e2e-wN``: ``slidemil.features.extract.extract_features`` on a real tiled slide with N
  DataLoader workers (reading, JPEG decoding, resizing, normalising, the model, writing);
- with ``--loader``, ``loader``: the loader's work alone on one core (each tile read, decoded
  and resized to uint8 CHW, as a DataLoader worker does), which says how many cores keep a
  GPU fed at a given rate, and ``loader-exact``: the same without scaled JPEG decoding
  (``scaled_decode: false``; the same as ``loader`` where tiles are read at under 2x input_px);
and prints tiles per second and the ratio end to end / model only (medians).

    python bench/extraction.py                                  # CPU, both extractors, workers 0 1 2
    python bench/extraction.py --device cuda --workers 8 16 --tiles 20000 --batch-size 256
    python bench/extraction.py --precision bf16                 # CPUs with bf16 units (AVX512-BF16/AMX)

On CUDA it also samples GPU utilisation (nvidia-smi) during each end-to-end run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import GpuSampler, dump, machine, make_large_slide, median

from slidemil.features.extractors import IMAGENET_MEAN, IMAGENET_STD, create_extractor
from slidemil.features.extract import TileDataset, autocast_for, compile_model, extract_features, resolve_device
from slidemil.runtime import resolve_precision
from slidemil.files.tiles import write_tiles
from slidemil.slides.reader import decode_scale, one_opencv_thread
from slidemil.tiling.tile import load_tiles, tile_slide


def tiled_slide(slide: str, n_tiles: int, tmp: Path) -> tuple[str, int]:
    """Tile the slide (default settings), keep the first ``n_tiles`` tiles (repeated if too few)."""
    full = Path(slide).with_name(Path(slide).name + ".tiles.h5")  # cached beside the slide (/tmp)
    if not full.exists() or full.stat().st_mtime < Path(slide).stat().st_mtime:
        tile_slide(slide, str(full), None, {})
    coords, attrs = load_tiles(str(full))
    if len(coords) == 0:
        raise SystemExit(f"{slide}: no tissue tiles")
    coords = np.resize(coords, (n_tiles, 2)) if n_tiles > len(coords) else coords[:n_tiles]
    out = tmp / "tiles.h5"
    write_tiles(out, coords, attrs)
    return str(out), len(coords)


class ModelOnly:
    """The model's share of extraction: uint8 batch already in memory -> normalise -> model -> features."""

    def __init__(self, extractor, device, precision, batch_size, input_px, n_tiles, torch_compile):
        self.dev = device
        self.precision = precision
        model, _ = create_extractor(extractor, "random", 0)
        self.model = model.to(device, memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(0)
        self.batch = torch.randint(0, 256, (batch_size, 3, input_px, input_px), dtype=torch.uint8, generator=g)
        if device.type == "cuda":
            self.batch = self.batch.to(device)  # "already in memory" of the device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.n_batches, self.last = divmod(n_tiles, batch_size)
        if torch_compile:
            with torch.inference_mode(), autocast_for(device, precision):
                self.model = compile_model(self.model, self.batch.float())

    def __call__(self):
        sizes = [len(self.batch)] * self.n_batches + ([self.last] if self.last else [])
        with torch.inference_mode(), autocast_for(self.dev, self.precision):
            for n in sizes:
                x = self.batch[:n].to(self.dev, non_blocking=True).float().sub_(self.mean).div_(self.std)
                out = self.model(x.contiguous(memory_format=torch.channels_last))
            out.float().cpu()  # waits for the device, as end to end does once per slide


def _cpu() -> float:
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def one_case(args) -> None:
    """Run one case in this (fresh) process and print its seconds as JSON: one process per slide, as in a job."""
    import json
    import time

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    precision = resolve_precision(dev, args.precision, need="inference").name
    extractor, n = args.extractors[0], args.n
    cpu0 = 0.0
    with GpuSampler() as gpu:
        if args.one in ("loader", "loader-exact"):
            coords, attrs = load_tiles(args.tiles_h5)
            read_px = int(attrs["read_px"])
            scale = decode_scale(read_px, args.input_px) if args.one == "loader" else 1
            dataset = TileDataset(args.slide, coords, int(attrs["level"]), read_px, args.input_px, scale)
            with one_opencv_thread():  # one core, as in a loader worker
                t0, cpu0 = time.perf_counter(), _cpu()
                for i in range(len(dataset)):
                    dataset[i]
        elif args.one == "model":
            model_only = ModelOnly(extractor, dev, precision, args.batch_size, args.input_px, n, args.compile)
            model_only()  # warm-up (allocator, cuDNN autotuning, compilation)
            t0, cpu0 = time.perf_counter(), _cpu()
            model_only()
        else:
            t0, cpu0 = time.perf_counter(), _cpu()  # everything a feature job does after Python starts
            extract_features(args.slide, args.tiles_h5, args.out, extractor, "random", args.input_px, 0, "float32",
                             str(dev), args.batch_size, int(args.one[len("e2e-w"):]), precision, args.threads,
                             torch_compile=args.compile)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    # CPU seconds of this process and its (joined) loader workers: the work done, whatever the load.
    cpu = _cpu() - cpu0
    print(json.dumps({"seconds": seconds, "gpu_busy": gpu.busy, "cpu_s": cpu}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", help="default: the generated large slide (made once under /tmp)")
    ap.add_argument("--extractors", nargs="+", default=["resnet50_trunc", "shufflenet_v2"])
    ap.add_argument("--tiles", type=int, default=192, help="tiles per run (CPU: a few hundred; GPU: 10,000+)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="auto, fp32, fp16, bf16")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the rule's threads)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides")
    ap.add_argument("--input-px", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader", action="store_true", help="also time the loader's work alone on one core")
    ap.add_argument("--json")
    for hidden in ("--one", "--tiles-h5", "--out"):  # one case in a child process
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one_case(args)

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    precision = resolve_precision(dev, args.precision, need="inference").name
    slide = args.slide or str(make_large_slide("/tmp/slidemil-bench/large.tiff"))
    results = []
    with tempfile.TemporaryDirectory(prefix="slidemil-bench-") as tmp:
        tmp = Path(tmp)
        tiles_h5, n = tiled_slide(slide, args.tiles, tmp)
        for extractor in args.extractors:
            common = [sys.executable, __file__, "--extractors", extractor, "--n", str(n), "--slide", slide,
                      "--tiles-h5", tiles_h5, "--out", str(tmp / "features.h5"), "--batch-size", str(args.batch_size),
                      "--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
                      "--input-px", str(args.input_px)] + (["--compile"] if args.compile else [])
            gpu_busy: dict[str, list] = {}
            cpu_s: dict[str, list] = {}

            def case(name):
                def run():
                    out = subprocess.run(common + ["--one", name], capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    gpu_busy.setdefault(name, []).append(r["gpu_busy"])
                    cpu_s.setdefault(name, []).append(r.get("cpu_s"))
                    return r["seconds"]
                return run

            cases = {"model": case("model"), **{f"e2e-w{w}": case(f"e2e-w{w}") for w in args.workers}}
            if args.loader:
                cases["loader"] = case("loader")
                cases["loader-exact"] = case("loader-exact")
            times = {k: [] for k in cases}
            for _ in range(args.repeats):  # interleaved: model, e2e-w0, e2e-w1, ..., model, ...
                for k, fn in cases.items():
                    times[k].append(fn())
            med = {k: median(v) for k, v in times.items()}
            rates = {k: round(n / v, 1) for k, v in med.items()}
            attrs = load_tiles(tiles_h5)[1]
            results.append({
                "extractor": extractor, "tiles": n, "batch_size": args.batch_size, "precision": precision,
                "compile": args.compile, "threads": args.threads, "read_px": int(attrs["read_px"]),
                "decode_scale": decode_scale(int(attrs["read_px"]), args.input_px),
                "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                "tiles_per_s": rates,
                "ratio_e2e_over_model": {k: round(rates[k] / rates["model"], 3) for k in rates
                                         if k.startswith("e2e")},
                # Loader cores a GPU run needs for the 5,000 tiles/s (the loader scales with workers).
                "loader_cores_for_5000_per_s": round(5000 / rates["loader"], 1) if "loader" in rates else None,
                "cpu_s_per_tile": {k: round(median(v) / n, 4) for k, v in cpu_s.items() if None not in v},
                "gpu_busy_pct": gpu_busy if dev.type == "cuda" else None,
            })
            print(results[-1], flush=True)
    dump({"machine": machine(), "device": str(dev), "slide": slide, "results": results}, args.json)


if __name__ == "__main__":
    main()

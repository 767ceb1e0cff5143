"""Shared helpers of the benchmark scripts: interleaved timing, machine facts, a large test slide.

Every figure the scripts print is a ratio of two things measured side by side in
one run: A and B alternate (A, B, A, B, ...) and the medians are compared, so
a neighbour's load on a shared machine hits both about equally.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The benches import the installed package; to measure another checkout's code (e.g. before a change), put
# its package folder first: PYTHONPATH=<checkout>/src (<checkout>/workflow before the src/ layout).
SHARED_SLIDES = ROOT.parent / "shared" / "data" / "slides"


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run each case ``repeats`` times, alternating between cases; wall seconds per run."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def machine() -> dict:
    """Facts about where a figure was measured."""
    import torch

    info = {
        "cpu": _cpu_name(),
        "cores_visible": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class GpuSampler:
    """Samples GPU utilisation with nvidia-smi (when present) while a block runs."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.samples, self._proc = interval_s, [], None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            ms = max(50, int(self.interval_s * 1000))
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]

    @property
    def busy(self) -> float | None:
        """Median utilisation in percent, ignoring the first and last samples (start-up, tail)."""
        s = self.samples[1:-1] or self.samples
        return float(np.median(s)) if s else None


def dump(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


# ---- a large generated slide --------------------------------------------------------------

BLOCK = 4096


def make_large_slide(path: str | os.PathLike, blocks: int = 10, mpp: float = 0.25, seed: int = 0,
                     jpeg_quality: int = 90, source: str | os.PathLike | None = None) -> Path:
    """A square Aperio-style pyramidal TIFF of ``blocks`` x ``blocks`` blocks, made without holding it in memory.

    One block (a rendered 4096 px demo slide, or with ``source`` the largest top-left
    square of that real slide's level 0 whose side is a multiple of 1024 px) is laid out
    as a mosaic: two thirds of the blocks are that image (each in one of 8 flips/rotations),
    the rest is blank glass, so the tissue mask has real work to do. Levels are written
    tile by tile from strips, so memory stays near 100 MB for a 40k slide.
    Reused when the file exists.
    """
    import cv2
    import openslide
    import tifffile

    from slidemil.demo.render import render_slide

    path = Path(path)
    if path.is_file():
        return path
    if source is None:
        rgb, _, _ = render_slide("bench-large", 1, seed, (BLOCK, BLOCK))
    else:
        real = openslide.OpenSlide(str(source))
        side = min(real.dimensions) // 1024 * 1024
        rgb = np.ascontiguousarray(np.asarray(real.read_region((0, 0), 0, (side, side)).convert("RGB")))
    block = rgb.shape[0]
    n_levels, down = 4, 4
    size0 = blocks * block
    pyramid = [rgb]
    for _ in range(n_levels - 1):
        prev = pyramid[-1]
        pyramid.append(cv2.resize(prev, (prev.shape[1] // down, prev.shape[0] // down), interpolation=cv2.INTER_AREA))

    blanks = [(np.full_like(img, 255), np.full_like(img, 250)) for img in pyramid]

    def block_at(level: int, bi: int, bj: int) -> np.ndarray:
        """A view (no copy): the caller slices before concatenating."""
        k = (bi * 7 + bj * 3) % 9
        if k >= 6 or (bi + bj) % 3 == 0:  # blank glass, pure or slightly grey
            return blanks[level][k == 8]
        img = np.rot90(pyramid[level], k % 4)
        return img[:, ::-1] if k >= 4 else img

    def level_data(level: int, tile: int = 256):
        """The whole level when small, else its tiles in row-major order built from one strip at a time."""
        bs, width = block // down**level, size0 // down**level
        if width <= BLOCK:
            return np.concatenate([np.concatenate([block_at(level, bi, bj) for bj in range(blocks)], axis=1)
                                   for bi in range(blocks)], axis=0)
        assert bs % tile == 0 and width % tile == 0

        def tiles():
            for y0 in range(0, width, tile):
                strip = np.concatenate([block_at(level, y0 // bs, bj)[y0 % bs:y0 % bs + tile]
                                        for bj in range(blocks)], axis=1)
                for x0 in range(0, width, tile):
                    yield strip[:, x0:x0 + tile]
        return tiles()

    header = (f"Aperio Image Library v12.0.0\r\n{size0}x{size0} [0,0 {size0}x{size0}] (256x256) "
              f"JPEG/RGB Q={jpeg_quality}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.tiff")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level in range(n_levels):
            w = size0 // down**level
            desc = (f"{header}|AppMag = {10 / mpp:g}|MPP = {mpp:g}" if level == 0 else
                    f"Aperio Image Library v12.0.0\r\n{size0}x{size0} -> {w}x{w} - (256x256) JPEG/RGB Q={jpeg_quality}")
            per_cm = 1e4 / (mpp * down**level)
            tw.write(level_data(level), shape=(w, w, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                     compression="jpeg", compressionargs={"level": jpeg_quality}, description=desc, metadata=None,
                     subfiletype=0 if level == 0 else 1, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="make the large benchmark slide")
    ap.add_argument("out", nargs="?", default="/tmp/slidemil-bench/large.tiff")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--source", help="a real slide whose level-0 pixels make the blocks (default: a demo slide)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    p = make_large_slide(a.out, a.blocks, a.mpp, source=a.source)
    print(p, f"{time.perf_counter() - t0:.1f}s")

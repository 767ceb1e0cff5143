"""Tiling speed against plainly reading the same tiles with OpenSlide, side by side.

For each slide it reports
- how many regions tiling decodes at the tile level (full resolution) against the
  grid, the coarse-mask candidates and the kept tiles: background is never decoded
  at full resolution when that count is at most the number of candidates, and no
  decode is wasted when it equals the number of kept tiles;
- interleaved wall times (A, B, C, D, A, B, C, D, ...) of
  A ``tile_slide`` (mask, brightness pre-check, reading and judging the remaining candidates, writing
    the HDF5; no QC picture),
  B ``read_region`` + ``np.asarray`` of the kept tiles only (same level, size, threads),
  C the same plain read of every candidate,
  D ``tile_slide`` with ``precheck_brightness: false`` (every candidate read and judged);
- ratios of medians: kept tiles per second of A over B (the target), candidates per second of
  D over C (what tiling adds to OpenSlide's decoding), and whether A and D keep the same tiles;
  for A over B also the median of each repeat's own ratio and the ratio of the fastest runs,
  which a noisy shared host sways less.

    python bench/tiling.py                                   # CMU-1-Small-Region + a 40,960 px generated slide
    python bench/tiling.py --slides /path/a.svs --threads 1 2 --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import openslide

from _common import SHARED_SLIDES, dump, interleaved, machine, make_large_slide, median

import slidemil.tiling.tile as tiling


def count_reads(slide_path: str, out_h5: str, params: dict) -> dict:
    """Run tile_slide once, recording every region it decodes (level and size; the thumbnail as "thumbnail")."""
    reads = []
    originals = tiling.read_rgb, tiling.read_gray, tiling.read_thumbnail

    def counted(read):
        def counting(slide, path, location, level, size):
            reads.append((level, size[0] * size[1]))
            return read(slide, path, location, level, size)
        return counting

    def counting_thumbnail(slide, path):
        img = originals[2](slide, path)
        reads.append(("thumbnail", img.shape[0] * img.shape[1]))
        return img

    tiling.read_rgb, tiling.read_gray, tiling.read_thumbnail = counted(originals[0]), counted(originals[1]), \
        counting_thumbnail
    try:
        summary = tiling.tile_slide(slide_path, out_h5, None, params)
    finally:
        tiling.read_rgb, tiling.read_gray, tiling.read_thumbnail = originals
    level = summary["level"]
    at_level = [px for lv, px in reads if lv == level]
    coarse = [px for lv, px in reads if lv != level]
    return {**summary, "full_res_regions_decoded": len(at_level),
            "full_res_px_decoded": int(sum(at_level)),
            "coarse_regions_decoded": len(coarse), "coarse_px_decoded": int(sum(coarse))}


def plain_read(slide_path: str, coords: np.ndarray, level: int, read_px: int, threads: int) -> None:
    slide = openslide.OpenSlide(slide_path)

    def read(xy):
        return np.asarray(slide.read_region((int(xy[0]), int(xy[1])), level, (read_px, read_px)))

    if threads <= 1:  # as tile_slide: no thread pool for one thread
        for xy in coords:
            read(xy)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(read, coords):
                pass
    slide.close()


def per_tile_costs(path: str, coords: np.ndarray, level: int, read_px: int, params: dict, n: int = 100) -> dict:
    """Median milliseconds per candidate of the plain read and of each step of judging it, tile by tile.

    The plain read and tiling's read use separate handles, so each decodes the tile from a cold cache."""
    import time

    p = tiling.TilingParams.from_dict(params)
    plain, slide = openslide.OpenSlide(path), openslide.OpenSlide(path)
    steps: dict[str, list[float]] = {"plain_read_region_asarray": [], "tiling_read_gray": [], "resize": [],
                                     "is_tissue": []}
    for xy in coords[:n]:
        loc = (int(xy[0]), int(xy[1]))
        t0 = time.perf_counter()
        np.asarray(plain.read_region(loc, level, (read_px, read_px)))
        t1 = time.perf_counter()
        gray = tiling.read_gray(slide, path, loc, level, (read_px, read_px))
        t2 = time.perf_counter()
        gray = tiling.resize_tile(gray, p.tile_px)
        t3 = time.perf_counter()
        tiling.is_tissue_gray(gray, p)
        t4 = time.perf_counter()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[k].append(v * 1e3)
    return {k: round(median(v), 3) for k, v in steps.items()}


def bench_slide(path: str, threads_list: list[int], repeats: int, params: dict, tmp: Path,
                target_only: bool = False) -> dict:
    out = str(tmp / "tiles.h5")
    reads = count_reads(path, out, params)
    kept, attrs = tiling.load_tiles(out)
    level, read_px = int(attrs["level"]), int(attrs["read_px"])
    unchecked = {**params, "precheck_brightness": False}
    out_unchecked = str(tmp / "tiles-unchecked.h5")
    tiling.tile_slide(path, out_unchecked, None, unchecked)
    same_tiles = bool(np.array_equal(kept, tiling.load_tiles(out_unchecked)[0]))
    # The candidates, as tiling computes them (mask only; no pixel reads at full resolution).
    candidates = _candidates(path, params, int(attrs["tile_size_level0"]))
    assert len(candidates) == reads["n_candidates"]
    result = {"slide": path, "dimensions": openslide.OpenSlide(path).dimensions, "reads": reads,
              "same_tiles_without_precheck": same_tiles,
              "per_candidate_ms": per_tile_costs(path, candidates, level, read_px, params), "runs": []}
    for threads in threads_list:
        cases = {
            "tiling": lambda: tiling.tile_slide(path, out, None, params, threads=threads),
            "read_kept": lambda: plain_read(path, kept, level, read_px, threads),
            "read_candidates": lambda: plain_read(path, candidates, level, read_px, threads),
            "tiling_without_precheck": lambda: tiling.tile_slide(path, out_unchecked, None, unchecked,
                                                                 threads=threads),
        }
        if target_only:
            cases = {k: cases[k] for k in ("tiling", "read_kept")}
        times = interleaved(cases, repeats)
        med = {k: median(v) for k, v in times.items()}
        run = {
            "threads": threads, "repeats": repeats,
            "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "kept_tiles_per_s": {"tiling": round(len(kept) / med["tiling"], 1),
                                 "plain_read": round(len(kept) / med["read_kept"], 1)},
            "ratio_kept": round(med["read_kept"] / med["tiling"], 3),
            # Two readings less swayed by a noisy host: the median of each repeat's own ratio (the two ran
            # back to back), and the ratio of the fastest runs (what each costs when nothing else interferes).
            "ratio_kept_paired": round(median([r / t for r, t in zip(times["read_kept"], times["tiling"])]), 3),
            "ratio_kept_fastest": round(min(times["read_kept"]) / min(times["tiling"]), 3),
        }
        if not target_only:
            run.update({
                "kept_tiles_per_s_without_precheck": round(len(kept) / med["tiling_without_precheck"], 1),
                "ratio_kept_without_precheck": round(med["read_kept"] / med["tiling_without_precheck"], 3),
                "candidates_per_s": {
                    "tiling_without_precheck": round(len(candidates) / med["tiling_without_precheck"], 1),
                    "plain_read": round(len(candidates) / med["read_candidates"], 1)},
                "ratio_candidates": round(med["read_candidates"] / med["tiling_without_precheck"], 3),
            })
        result["runs"].append(run)
    return result


def _candidates(path: str, params: dict, step0: int) -> np.ndarray:
    slide = tiling.open_slide(path)
    p = tiling.TilingParams.from_dict(params)
    return tiling.tissue_candidates(slide, path, p, step0, tiling.overview_sources(slide))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", nargs="*", help="default: CMU-1-Small-Region.svs and the generated large slide")
    ap.add_argument("--large", default="/tmp/slidemil-bench/large.tiff",
                    help="where the generated slide is made (once) when --slides is not given")
    ap.add_argument("--large-blocks", type=int, default=10, help="its size in 4096 px blocks (10: 40,960 px)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target-only", action="store_true",
                    help="time only tiling and the plain read of its kept tiles: more repeats in the same time")
    ap.add_argument("--json")
    args = ap.parse_args()
    cv2.setNumThreads(1)  # as in a tiling job; OpenCV's pool would otherwise compete with the readers
    slides = args.slides or [str(SHARED_SLIDES / "CMU-1-Small-Region.svs"),
                             str(make_large_slide(args.large, args.large_blocks))]
    params = {}  # the default tiling settings: 256 px at 0.5 mpp
    with tempfile.TemporaryDirectory(prefix="slidemil-bench-") as tmp:
        results = [bench_slide(s, args.threads, args.repeats, params, Path(tmp), args.target_only) for s in slides]
    dump({"machine": machine(), "params": params or "defaults", "slides": results}, args.json)


if __name__ == "__main__":
    main()

"""Every registered pathology encoder on this machine: model-only speed in fp32 and bf16, and how far bf16
features are from fp32 ones.

For each encoder, in a fresh process (a giant's memory is returned between encoders), on real tiles of the
generated large slide normalised with the encoder's own mean/std, at the encoder's input size:
- model-only tiles per second in fp32 and under bf16 autocast, interleaved (fp32, bf16, fp32, bf16, ...),
  median of ``--repeats``, and the ratio bf16 / fp32;
- bf16 against fp32 features of the same tiles: the median distance between a tile's bf16 and fp32 features
  over the median distance of fp32 features from their mean (how large the error is next to what tells tiles
  apart), and the smallest cosine similarity of bf16 and fp32 features after centring on the fp32 mean;
- parameter count and peak resident memory.

Weights are random (no weights can be downloaded here), drawn as timm initialises the architecture: speed and
memory do not depend on the values, the bf16 tolerance on trained weights may differ. End to end vs model only
for one encoder is ``bench/extraction.py --extractors <name> --input-px <px>``.

    python bench/encoders.py                                # every registered encoder, 8 tiles
    python bench/encoders.py --encoders dinov2_vits14 uni --tiles 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import dump, machine, make_large_slide, median
from extraction import tiled_slide

from slidemil.features.extract import TileDataset
from slidemil.features.extractors import create_extractor, get_spec
from slidemil.files.tiles import read_tiles
from slidemil.names import ENCODER_CARDS
from slidemil.runtime import resolve_precision


def real_batch(slide: str, tiles_h5: str, n_tiles: int, input_px: int) -> torch.Tensor:
    """``n_tiles`` uint8 CHW tiles of the slide at ``input_px``, read as an extraction job reads them."""
    coords, attrs = read_tiles(tiles_h5)
    dataset = TileDataset(slide, coords[:n_tiles], int(attrs["level"]), int(attrs["read_px"]), input_px)
    return torch.stack([dataset[i] for i in range(len(dataset))])


def one_encoder(args) -> dict:
    """Measure one encoder in this process; returns its row."""
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    name, px = args.encoders[0], ENCODER_CARDS[args.encoders[0]].px
    spec = get_spec(name)
    model, _ = create_extractor(name, "random", 0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    x = real_batch(args.slide, args.tiles_h5, args.tiles, px).float().sub_(mean).div_(std)

    def features(precision: str) -> torch.Tensor:
        with torch.inference_mode(), resolve_precision(cpu, precision, need="inference").autocast(cpu):
            return torch.cat([model(b).float() for b in x.split(args.batch_size)])

    ref, low = features("fp32"), features("bf16")  # also the warm-up of both
    seconds = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for precision in seconds:
            t0 = time.perf_counter()
            features(precision)
            seconds[precision].append(time.perf_counter() - t0)
    rate = {p: len(x) / median(s) for p, s in seconds.items()}
    # Relative to what tells tiles apart, not to the vector's length: an untrained ViT's class token is mostly
    # the same vector for every tile, which would make any error look small next to it.
    spread = (ref - ref.mean(0)).norm(dim=1).median().clamp_min(1e-12)
    err_over_spread = ((low - ref).norm(dim=1) / spread).numpy()
    centred = torch.nn.functional.cosine_similarity(low - ref.mean(0), ref - ref.mean(0), dim=1).numpy()
    return {"encoder": name, "input_px": px, "dim": int(ref.shape[1]), "tiles": len(x),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "fp32_tiles_per_s": round(rate["fp32"], 3), "bf16_tiles_per_s": round(rate["bf16"], 3),
            "bf16_over_fp32": round(rate["bf16"] / rate["fp32"], 2),
            "bf16_err_over_spread_median": round(float(np.median(err_over_spread)), 4),
            "bf16_centred_cosine_min": round(float(centred.min()), 4),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=list(ENCODER_CARDS), choices=list(ENCODER_CARDS))
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slide", help="default: the generated large slide (made once under /tmp)")
    ap.add_argument("--json")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiles-h5", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_encoder(args)))
        return
    slide = args.slide or str(make_large_slide("/tmp/slidemil-bench/large.tiff"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="slidemil-bench-") as tmp:
        tiles_h5, _ = tiled_slide(slide, args.tiles, Path(tmp))
        for name in args.encoders:
            cmd = [sys.executable, __file__, "--one", "--encoders", name, "--slide", slide, "--tiles-h5", tiles_h5,
                   "--tiles", str(args.tiles), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    dump({"machine": machine(), "slide": slide, "results": rows}, args.json)


if __name__ == "__main__":
    main()

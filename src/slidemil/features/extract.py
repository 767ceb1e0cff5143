"""Stage 2: one feature vector per tile, written as a CLAM-compatible HDF5 file.

Tiles are read from the slide through the tiling coordinates by DataLoader
workers, each with its own OpenSlide handle; they travel as uint8 (pinned on
CUDA) and are normalised on the device, which keeps the workers and the
host-to-device copy light. Features stay on the device until the slide is done,
so the GPU never waits for a per-batch copy back. Mixed precision on CUDA
(fp16 by default), bf16 on CPUs on request; optional torch.compile.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from slidemil.config import Compute, Config, ExtractorSettings, Features, extractor_defaults, field_defaults
from slidemil.names import FEATURE_PRECISIONS as PRECISIONS
from slidemil.runtime import Precision, resolve_device, resolve_precision, warn_if_bf16_emulated
from slidemil.features.encoders import EncoderSpec
from slidemil.features.extractors import ExtractorSpec, create_extractor, get_spec
from slidemil.files.features import write_features
from slidemil.logs import setup_logging
from slidemil.slides.reader import decode_scale, one_opencv_thread, open_slide, read_rgb, resize_tile
from slidemil.files.tiles import check_tiles_slide, read_tiles
from slidemil.weights import is_local, weights_sha256

logger = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Tiles of one slide at the tiling's level and size, resized to ``input_px``, as uint8 CHW.

    ``scale`` > 1 reads each tile at 1/``scale`` resolution before the resize (JPEG tiles decoded at that scale).
    """

    def __init__(self, slide_path: str, coords: np.ndarray, level: int, read_px: int, input_px: int, scale: int = 1):
        self.slide_path, self.coords = str(slide_path), coords
        self.level, self.read_px, self.input_px, self.scale = level, read_px, input_px, scale
        self._slide = None  # opened lazily, so each worker process gets its own handle

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.slide_path)
        x, y = (int(v) for v in self.coords[i])
        tile = read_rgb(self._slide, self.slide_path, (x, y), self.level, (self.read_px, self.read_px), self.scale)
        tile = resize_tile(tile, self.input_px)
        return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))


def autocast_for(device: torch.device, precision: str):
    """The autocast of feature extraction: the runtime policy for inference (``auto``: fp16 on CUDA, fp32
    elsewhere; bf16 on CPU only on request)."""
    return resolve_precision(device, precision, need="inference").autocast(device)


def extract_features(
    slide_path: str | None,
    tiles_h5: str,
    out_h5: str,
    extractor: str = "resnet50_trunc",
    weights: str = "imagenet",
    input_px: int = 224,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
    precision: str = "auto",
    threads: int | None = None,
    slide_id: str | None = None,
    torch_compile: bool = False,
    scaled_decode: bool = True,
    options: dict | None = None,
) -> dict:
    """Extract features of every tile listed in ``tiles_h5``; write ``out_h5`` atomically.

    ``precision`` and ``scaled_decode`` change the features slightly (they are settings of the extractor);
    ``scaled_decode`` reads tiles at least twice ``input_px`` (40x scans at 20x) at 1/2, 1/4 or 1/8 resolution
    before the resize, which for JPEG-tiled 40x slides cuts the loader's CPU time per tile by a third;
    ``device``, ``batch_size``, ``workers``, ``threads`` and ``torch_compile`` only change
    how fast they come. ``options``: the generic ``timm`` extractor's settings (arch, timm_kwargs, mean, std,
    pool). A local weights file's sha256 is recorded as ``weights_sha256`` (Hugging Face lists the same digest).
    """
    coords, tile_attrs = read_tiles(tiles_h5)
    slide_path, slide_id = _slide_of_tiles(slide_path, tiles_h5, tile_attrs, slide_id)
    if tile_attrs.get("excluded"):
        return write_excluded_features(out_h5, slide_id, extractor, weights, input_px, dtype, tile_attrs,
                                       get_spec(extractor, options).dim)
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    spec = get_spec(extractor, options)
    model, digest, amp = _load_model(extractor, weights, seed, options, dev, precision)
    if torch_compile and len(coords):
        with torch.inference_mode(), amp.autocast(dev):
            model = compile_model(model, torch.zeros((min(batch_size, len(coords)), 3, input_px, input_px), device=dev))
    read_px = int(tile_attrs["read_px"])
    scale = decode_scale(read_px, input_px) if scaled_decode else 1
    dataset = TileDataset(slide_path, coords, int(tile_attrs["level"]), read_px, input_px, scale)
    feats = _tile_features(model, spec, dataset, _Run(dev, amp, batch_size, workers), slide_id, tiles_h5)
    if not np.isfinite(feats).all():
        raise RuntimeError(f"{slide_id}: non-finite features from {extractor} ({weights}); check the weights")
    attrs = _feature_attrs(slide_id, extractor, weights, digest, input_px, tile_attrs, amp.name, scale)
    write_features(out_h5, feats.astype(dtype), coords.reshape(-1, 2), attrs)
    logger.info("%s: %d tiles -> %s (%s, digest %s)", slide_id, len(coords), out_h5, extractor, digest)
    return {"slide_id": slide_id, "n_tiles": len(coords), "dim": spec.dim, "weights_digest": digest}


@dataclass(frozen=True)
class _Run:
    """Where and how the extractor runs over one slide's tiles."""

    dev: torch.device
    amp: Precision
    batch_size: int
    workers: int


def _slide_of_tiles(slide_path: str | None, tiles_h5: str, tile_attrs: dict, slide_id: str | None) -> tuple[str, str]:
    """(path, id) of the slide the tiles are read from."""
    if slide_path and not tile_attrs.get("excluded"):
        # A slide given with the tiles (the command line): coordinates of another slide would read wrong pixels.
        slide = open_slide(slide_path)
        check_tiles_slide(tiles_h5, tile_attrs, slide_path, slide.dimensions)
        slide.close()
    # The DAG passes no slide: the tiles file names the one it was cut from.
    slide_path = slide_path or str(tile_attrs["slide_path"])
    return slide_path, slide_id or Path(slide_path).stem


def _load_model(extractor: str, weights: str, seed: int, options: dict | None, dev: torch.device,
                precision: str) -> tuple[torch.nn.Module, str, Precision]:
    """(model on ``dev`` in channels-last, weights digest, the inference precision ``precision`` resolves to)."""
    model, digest = create_extractor(extractor, weights, seed, options)
    model = model.to(dev, memory_format=torch.channels_last)
    amp = resolve_precision(dev, precision, need="inference")
    warn_if_bf16_emulated(dev, amp.name, f"features.settings.{extractor}.precision")
    return model, digest, amp


def _tile_features(model: torch.nn.Module, spec: ExtractorSpec | EncoderSpec, dataset: TileDataset, run: _Run,
                   slide_id: str, tiles_h5: str) -> np.ndarray:
    """The features of every tile of ``dataset``, [N, dim] float32; an empty slide gives 0 rows and a warning."""
    feats = torch.zeros((len(dataset), spec.dim), dtype=torch.float32, device=run.dev)
    if len(dataset) == 0:
        logger.warning("%s: no tiles in %s; writing an empty feature file", slide_id, tiles_h5)
    else:
        _fill_features(model, spec, dataset, run, slide_id, feats)
    return feats.cpu().numpy()


def _fill_features(model: torch.nn.Module, spec: ExtractorSpec | EncoderSpec, dataset: TileDataset, run: _Run,
                   slide_id: str, feats: torch.Tensor) -> None:
    """Run the model over ``dataset`` in batches, normalising on the device, into ``feats`` (one row a tile)."""
    mean = torch.tensor(spec.mean, device=run.dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=run.dev).view(1, 3, 1, 1) * 255
    loader = DataLoader(dataset, batch_size=run.batch_size, num_workers=run.workers, shuffle=False,
                        pin_memory=run.dev.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if run.workers else None)
    n, start, next_log = len(feats), 0, 0
    with one_opencv_thread(), torch.inference_mode(), run.amp.autocast(run.dev):
        for batch in tqdm(loader, desc=f"features {slide_id}", mininterval=2, disable=None):
            x = batch.to(run.dev, non_blocking=True).float().sub_(mean).div_(std)
            out = model(x.contiguous(memory_format=torch.channels_last))
            feats[start:start + len(out)] = out  # stays on the device: no per-batch sync
            start += len(out)
            # tqdm is silent in log files (no terminal): cluster logs get a line per tenth instead.
            if start >= next_log:
                logger.info("%s: %d/%d tiles", slide_id, start, n)
                next_log = start + max(1, n // 10)


def _feature_attrs(slide_id: str, extractor: str, weights: str, digest: str, input_px: int, tile_attrs: dict,
                   precision: str, scale: int) -> dict:
    """The attributes of an extracted slide's feature file."""
    return {
        "slide_id": slide_id, "extractor": extractor, "weights": str(weights), "weights_digest": digest,
        "weights_sha256": weights_sha256(weights) if is_local(weights) else "", "excluded": "",
        "input_px": input_px, "tile_px": int(tile_attrs["tile_px"]), "target_mpp": float(tile_attrs["target_mpp"]),
        "level": int(tile_attrs["level"]), "tile_size_level0": int(tile_attrs["tile_size_level0"]),
        "precision": precision, "decode_scale": scale,
    }


def write_excluded_features(out_h5, slide_id, extractor, weights, input_px, dtype, tile_attrs, dim: int) -> dict:
    """An excluded slide (see tiling) passes on as zero rows with the same ``excluded`` reason."""
    reason = str(tile_attrs["excluded"])
    attrs = {
        "slide_id": slide_id, "extractor": extractor, "weights": str(weights), "input_px": input_px,
        "tile_px": int(tile_attrs["tile_px"]), "target_mpp": float(tile_attrs["target_mpp"]),
        "level": -1, "tile_size_level0": 0, "excluded": reason,
    }
    write_features(out_h5, np.zeros((0, dim), dtype=dtype), np.zeros((0, 2), np.int64), attrs)
    logger.warning("%s: excluded at tiling (%s); writing an empty feature file", slide_id, reason)
    return {"slide_id": slide_id, "n_tiles": 0, "dim": dim, "excluded": reason}


def compile_model(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """torch.compile when it works here (it needs a C++ compiler on CPU); the eager model otherwise.

    Compilation happens at the first call, so the example batch is run once to find out.
    """
    try:
        compiled = torch.compile(model)
        compiled(example.contiguous(memory_format=torch.channels_last))
        return compiled
    except Exception as err:  # compile support varies by platform; speed is never worth failing for
        logger.warning("torch.compile unavailable (%s); running the model eagerly", err)
        return model


def build_parser(prog: str = "python -m slidemil.features.extract") -> argparse.ArgumentParser:
    """The command line. Its defaults are the workflow's (slidemil.config): the default extractor, its
    settings as config/config.yaml gives them, the compute section's device, batch size, workers and compile."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide")
    ap.add_argument("--tiles", required=True, help="HDF5 from the tiling stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--extractor", default=field_defaults(Features)["extractors"][0])
    per_extractor = "default: the extractor's features.settings in config/config.yaml"
    ap.add_argument("--weights", help="imagenet, random, or a local weights file / Hugging Face snapshot folder "
                    f"(never downloaded); {per_extractor}")
    ap.add_argument("--timm", type=json.loads, metavar="JSON",
                    help='the timm extractor\'s settings, e.g. \'{"arch": "vit_small_patch14_dinov2", '
                         '"timm_kwargs": {"img_size": 224}, "pool": "cls"}\' (also mean, std)')
    ap.add_argument("--input-px", type=int, help=per_extractor)
    ap.add_argument("--dtype", choices=ExtractorSettings.__dataclass_fields__["dtype"].metadata["choices"],
                    help=per_extractor)
    ap.add_argument("--seed", type=int, default=Config.seed, help="seeds random weights")
    ap.add_argument("--device", default=Compute.device)
    ap.add_argument("--batch-size", type=int, default=Compute.batch_size)
    ap.add_argument("--workers", type=int, default=Compute.loader_workers)
    ap.add_argument("--precision", choices=PRECISIONS, help="auto: fp16 on CUDA, fp32 on CPU; bf16 helps on CPUs "
                    f"with bf16 units; {per_extractor}")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=Compute.torch_compile,
                    help="torch.compile the extractor")
    ap.add_argument("--scaled-decode", action=argparse.BooleanOptionalAction,
                    help="--no-scaled-decode decodes every tile at full resolution before resizing (slower at 40x; "
                         f"features differ slightly); {per_extractor}")
    return ap


def cli_settings(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The extractor's settings: those given on the command line over the config's for that extractor."""
    settings = extractor_defaults(args.extractor)
    for name in ("weights", "input_px", "dtype", "precision", "scaled_decode"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
        elif name not in settings:  # an extractor config/config.yaml does not list: no default to take
            ap.error(f"--{name.replace('_', '-')} is required for --extractor {args.extractor} "
                     "(config/config.yaml has no settings for it)")
    return settings


def main(argv=None, prog: str = "python -m slidemil.features.extract") -> None:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    settings = cli_settings(ap, args)
    setup_logging()
    # A user error (missing slide, wrong weights, no GPU): slidemil.cli prints its one line and exits 1.
    print(extract_features(args.slide, args.tiles, args.out, extractor=args.extractor, weights=settings["weights"],
                           input_px=settings["input_px"], seed=args.seed, dtype=settings["dtype"],
                           device=args.device, batch_size=args.batch_size, workers=args.workers,
                           precision=settings["precision"], threads=args.threads, torch_compile=args.compile,
                           scaled_decode=settings["scaled_decode"], options=args.timm))


if __name__ == "__main__":
    from slidemil.errors import USER_ERRORS, command_line_message

    try:
        main()
    except USER_ERRORS as err:  # one line, as from slidemil.cli
        raise SystemExit(f"error: {command_line_message(err)}")

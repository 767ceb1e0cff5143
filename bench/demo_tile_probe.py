"""How well each extractor's tile features separate tumour from normal tiles on the demo cohort.

The first demo's slide-level task was easy enough that every extractor reached a
test AUC of 1.0 with AB-MIL, which cannot tell features apart (the harder default
of docs/performance.md#demo-cohort leaves room). The synthetic slides
come with ground truth, though: re-rendering a slide from its seed gives the
lesion mask, so every kept tile gets a tumour/normal label (tumour: at least
25 % of the tile is lesion, the demo's own definition). A linear probe
(standardised logistic regression) is fitted on the tiles of the slides that
are never test and scored on the test slides' tiles: tile-level ROC AUC. A
second probe sees only a few labelled tiles per class (repeated draws), where
a better representation should show first.

    python bench/demo_tile_probe.py --results /tmp/sd/results            # every extractor found there
    python bench/demo_tile_probe.py --results results --extractors shufflenet_v2 shufflenet_simclr

The demo settings (seed, slide size, tumour fraction) are read from
config/config.yaml unless --config names another file; they must be those the
cohort was made with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
from slidemil.demo.render import TUMOR_TILE_MIN_FRACTION, render_cohort_slide  # noqa: E402


def tile_truth(results: Path, demo: dict, slides: pd.DataFrame, features_dir: Path) -> dict[str, np.ndarray]:
    """slide_id -> bool per row of its feature file: is the tile tumour?"""
    truth = {}
    for row in slides.itertuples(index=False):
        _, masks, _ = render_cohort_slide(demo, row.slide_id)
        lesion = masks["lesion"]
        with h5py.File(features_dir / f"{row.slide_id}.h5", "r") as f:
            coords = f["coords"][()].reshape(-1, 2)
            size = int(f.attrs["tile_size_level0"]) if len(coords) else 0
        truth[row.slide_id] = np.array(
            [lesion[y:y + size, x:x + size].mean() >= TUMOR_TILE_MIN_FRACTION for x, y in coords], dtype=bool)
    return truth


def load(features_dir: Path, slide_ids: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for s in slide_ids:
        with h5py.File(features_dir / f"{s}.h5", "r") as f:
            out[s] = f["features"][()].astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="results folder of a finished run on the demo cohort")
    ap.add_argument("--extractors", nargs="*", help="default: every folder under results/features")
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"), help="config holding the demo section")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--few", type=int, default=8, help="labelled tiles per class in the few-label probe")
    ap.add_argument("--draws", type=int, default=20, help="random draws of the few-label probe")
    args = ap.parse_args()

    results = Path(args.results)
    demo = yaml.safe_load(Path(args.config).read_text())["demo"]
    sheet = pd.read_csv(results / "demo" / "samples.csv", dtype={"slide_id": str})
    splits = pd.read_csv(results / "splits" / "splits.csv", dtype={"slide_id": str})
    folds = [c for c in splits.columns if c.startswith("fold_")]
    test = set(splits.loc[(splits[folds] == "test").any(axis=1), "slide_id"])
    extractors = args.extractors or sorted(p.name for p in (results / "features").iterdir() if p.is_dir())

    truth = tile_truth(results, demo, sheet, results / "features" / extractors[0])
    train_ids = [s for s in sheet.slide_id if s not in test]
    test_ids = [s for s in sheet.slide_id if s in test]
    y_train = np.concatenate([truth[s] for s in train_ids])
    y_test = np.concatenate([truth[s] for s in test_ids])
    print(f"# tiles: {len(y_train)} from {len(train_ids)} training slides ({y_train.mean():.1%} tumour), "
          f"{len(y_test)} from {len(test_ids)} test slides ({y_test.mean():.1%} tumour)")
    print(f"| extractor | tile-level tumour AUC, probe on all training tiles | train AUC | "
          f"probe on {args.few} + {args.few} labelled tiles, mean +- std of {args.draws} draws |")
    print("|---|---:|---:|---:|")
    for name in extractors:
        feats = load(results / "features" / name, list(sheet.slide_id))
        for s in sheet.slide_id:
            if len(feats[s]) != len(truth[s]):
                sys.exit(f"{name}/{s}.h5 has {len(feats[s])} tiles, the first extractor {len(truth[s])}")
        x_train = np.concatenate([feats[s] for s in train_ids])
        x_test = np.concatenate([feats[s] for s in test_ids])
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, random_state=args.seed))
        probe.fit(x_train, y_train)
        auc_test = roc_auc_score(y_test, probe.predict_proba(x_test)[:, 1])
        auc_train = roc_auc_score(y_train, probe.predict_proba(x_train)[:, 1])
        # Few labels: where a better representation should show first. Same draws for every extractor.
        rng = np.random.default_rng(args.seed)
        pos, neg = np.flatnonzero(y_train), np.flatnonzero(~y_train)
        few = []
        for _ in range(args.draws):
            pick = np.concatenate([rng.choice(pos, args.few, replace=False), rng.choice(neg, args.few, replace=False)])
            small = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, random_state=args.seed))
            small.fit(x_train[pick], y_train[pick])
            few.append(roc_auc_score(y_test, small.predict_proba(x_test)[:, 1]))
        print(f"| {name} | {auc_test:.3f} | {auc_train:.3f} | {np.mean(few):.3f} +- {np.std(few, ddof=1):.3f} |")


if __name__ == "__main__":
    main()

"""Memory and load time of training jobs that run side by side on one node, as Snakemake runs folds.

    python bench/mil_load.py --bags 270 --tiles 9000 --jobs 3                  # this checkout
    python bench/mil_load.py --bags 270 --tiles 9000 --jobs 3 --repo <older checkout>

Writes ``--bags`` feature files of ``--tiles`` x ``--dim`` float16 (as the extraction stage does,
kept in ``--dir`` for later runs) and a splits table, then starts ``--jobs`` processes at once,
each running ``slidemil.mil.train.train_fold`` of the given checkout on its own fold (``--model``,
``--epochs``). Every job samples its own memory every 10 ms; the script prints per job the
seconds spent loading the bags and in all, and the peak of anonymous memory (the job's own
copy of anything) and of file-backed memory (mapped pages of the feature files, shared with
the other jobs through the page cache). The sum of the anonymous peaks plus one copy of the
features is what the jobs need together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import ROOT, machine

CHILD = r"""
import json, sys, threading, time
from slidemil.mil import train

peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()

def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in peak}

def sample():
    while not done.is_set():
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.01)

loading = {}
load_bags = train.load_bags
def timed_load(*a, **k):
    t0 = time.perf_counter()
    out = load_bags(*a, **k)
    loading["s"] = time.perf_counter() - t0
    return out
train.load_bags = timed_load

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
fold, model, epochs, features_dir, splits, out = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
from pathlib import Path
features = {p.stem: str(p) for p in sorted(Path(features_dir).glob("*.h5"))}
recipe = train.Recipe(model, {}, {"epochs": epochs, "patience": epochs}, 0)
train.train_fold(features, splits, fold, recipe, out, device="cpu", num_threads=1)
total = time.perf_counter() - t0
done.set()
for k, v in status().items():
    peak[k] = max(peak[k], v)
print(json.dumps({"fold": fold, "load_s": loading.get("s"), "total_s": total,
                  "anon_gib": peak["RssAnon"] / 2**30, "file_gib": peak["RssFile"] / 2**30}))
"""


def make_features(folder: Path, n_bags: int, n_tiles: int, dim: int, n_folds: int) -> Path:
    from slidemil.files import write_h5

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_bags):
        path = folder / f"bag{i:04d}.h5"
        if not path.exists():
            bag = rng.standard_normal((n_tiles, dim), dtype=np.float32) + (i % 2) * 0.05
            write_h5(path, {"features": bag.astype(np.float16), "coords": np.zeros((n_tiles, 2), np.int32)})
    ids = [f"bag{i:04d}" for i in range(n_bags)]
    table = pd.DataFrame({"slide_id": ids, "patient_id": ids, "label": [i % 2 for i in range(n_bags)]})
    for k in range(n_folds):
        # Fold k: every fifth bag (shifted by k) is test, the next fifth val, the rest train.
        table[f"fold_{k}"] = [("test", "val", "train", "train", "train")[(i + k) % 5] for i in range(n_bags)]
    splits = folder.parent / f"{folder.name}-splits.csv"
    table.to_csv(splits, index=False)
    return splits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=270)
    parser.add_argument("--tiles", type=int, default=9000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=3, help="training jobs started at once (one fold each)")
    parser.add_argument("--model", default="meanpool", help="a cheap model keeps the time on loading")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose slidemil.mil.train runs")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/slidemil-bench"))
    args = parser.parse_args(argv)

    folder = args.dir / f"mil-load-{args.bags}x{args.tiles}x{args.dim}"
    t0 = time.perf_counter()
    splits = make_features(folder, args.bags, args.tiles, args.dim, args.jobs)
    gib = args.bags * args.tiles * args.dim * 2 / 2**30
    print(f"# {args.bags} bags x {args.tiles} x {args.dim} float16 = {gib:.2f} GiB of features "
          f"({time.perf_counter() - t0:.0f} s to make or find); {args.jobs} job(s) of {args.model}, "
          f"{args.epochs} epoch(s); checkout {args.repo}; {json.dumps(machine())}")
    # Warm the page cache, as the jobs after the first on a node find it.
    for p in sorted(folder.glob("*.h5")):
        p.read_bytes()
    out = args.dir / "mil-load-out"
    # The checkout's package comes first on the children's path (src/, or workflow/ before that layout).
    package_dir = args.repo / "src" if (args.repo / "src").is_dir() else args.repo / "workflow"
    env = dict(os.environ, PYTHONPATH=str(package_dir))
    jobs = [subprocess.Popen([sys.executable, "-c", CHILD, str(k), args.model,
                              str(args.epochs), str(folder), str(splits), str(out / f"fold{k}")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            for k in range(args.jobs)]
    rows = []
    for job in jobs:
        stdout, _ = job.communicate()
        if job.returncode:
            sys.exit(f"a job failed (exit {job.returncode}); run it alone to see why")
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
    print("| job | load s | total s | peak anonymous GiB | peak file-backed GiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| fold {r['fold']} | {r['load_s']:.1f} | {r['total_s']:.1f} | {r['anon_gib']:.2f} | {r['file_gib']:.2f} |")
    anon = sum(r["anon_gib"] for r in rows)
    shared = max(r["file_gib"] for r in rows)
    print(f"together: {anon:.2f} GiB anonymous + {shared:.2f} GiB of shared file pages = {anon + shared:.2f} GiB")


if __name__ == "__main__":
    main()

"""Time `snakemake -n` (DAG building) on a 1,000-slide sample sheet.

The sheet points at real files (symlinks to one small generated TIFF), because
the sheet check verifies that every slide file exists and is readable.

    python bench/dryrun.py --slides 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from _common import ROOT, dump, machine, median


def make_cohort(folder: Path, n_slides: int) -> Path:
    from slidemil.demo.render import make_slide

    slides = folder / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    source = slides / "source.tiff"
    if not source.exists():
        make_slide(source, label=0, seed=0, slide_px=(512, 512))
    rows = []
    for i in range(n_slides):
        link = slides / f"S{i:05d}.tiff"
        if not link.exists():
            link.symlink_to(source)
        # Two slides per patient, alternating labels by patient.
        rows.append((f"S{i:05d}", f"P{i // 2:05d}", f"slides/{link.name}", (i // 2) % 2))
    sheet = folder / "samples.csv"
    pd.DataFrame(rows, columns=["slide_id", "patient_id", "path", "label"]).to_csv(sheet, index=False)
    return sheet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", help="default: a fresh temporary folder")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose Snakefile to time (e.g. an older one)")
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="slidemil-dryrun-"))
    sheet = make_cohort(workdir, args.slides)
    # The default configuration (one extractor, two MIL models, 5 folds) on the generated sheet.
    config = {"samples": str(sheet), "results": str(workdir / "results")}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(next(p for p in (Path(args.repo) / "workflow" / "Snakefile", Path(args.repo) / "Snakefile") if p.exists())), "--configfile", "config.yaml",
           "--cores", "1", "-n"]
    env = dict(os.environ, PYTHONPATH=str(Path(args.repo) / "workflow"))
    times, cpu, n_jobs = [], [], None
    for _ in range(args.repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds are what an idle core would take: on a shared machine wall time also counts waiting.
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        if proc.returncode != 0:
            sys.exit(f"snakemake -n failed:\n{proc.stderr[-3000:]}")
        n_jobs = proc.stdout + proc.stderr
    total = next((line.split()[-1] for line in n_jobs.splitlines() if line.strip().startswith("total")), "?")
    dump({"slides": args.slides, "jobs": total, "dry_run_s": [round(t, 2) for t in times],
          "median_s": round(median(times), 2), "cpu_s": [round(t, 2) for t in cpu],
          "median_cpu_s": round(median(cpu), 2), "command": " ".join(cmd), "workdir": str(workdir),
          "machine": machine()}, args.json)


if __name__ == "__main__":
    main()

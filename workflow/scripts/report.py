from pathlib import Path

import _step

_step.start(snakemake)
from slidemil.report_page import build_report  # noqa: E402

inp = snakemake.input
runs = [
    dict(run, predictions=pred, history=hist, checkpoint=ckpt)
    for run, pred, hist, ckpt in zip(snakemake.params.runs, inp.predictions, inp.histories, inp.checkpoints)
]
# Files are named {slide}.h5 / .png and features sit in one folder per extractor.
features = {}
for path in inp.features:
    features.setdefault(Path(path).parent.name, {})[Path(path).stem] = path
tiles = {Path(p).stem: p for p in inp.tiles} or None
qc = {Path(p).stem: p for p in inp.qc} or None
_step.run(
    build_report,
    runs,
    out_dir=str(Path(snakemake.output.html).parent),
    settings=snakemake.params.report,
    seed=snakemake.params.seed,
    sheet=inp.sheet,
    splits=inp.splits,
    features=features,
    tiles=tiles,
    qc=qc,
    device=snakemake.resources.device,
)

from pathlib import Path

import _step

_step.start(snakemake)
from slidemil.report import make_report  # noqa: E402

runs = [
    dict(run, predictions=pred, history=hist)
    for run, pred, hist in zip(snakemake.params.runs, snakemake.input.predictions, snakemake.input.histories)
]
_step.run(
    make_report,
    runs,
    out_dir=str(Path(snakemake.output[0]).parent),
    n_bootstrap=snakemake.params.report["n_bootstrap"],
    seed=snakemake.params.seed,
)

from pathlib import Path

import _step

_step.start(snakemake)
from slidemil.report import make_report  # noqa: E402

runs = [
    dict(run, predictions=pred, history=hist)
    for run, pred, hist in zip(snakemake.params.runs, snakemake.input.predictions, snakemake.input.histories)
]
summary = _step.run(
    make_report,
    runs,
    out_dir=str(Path(snakemake.output[0]).parent),
    n_bootstrap=snakemake.params.report["n_bootstrap"],
    seed=snakemake.params.seed,
)

# Slides left out at tiling (broken, no mpp, no tissue) and why: a table and a section in summary.md.
from slidemil.cohort import excluded_slides  # noqa: E402
from slidemil.io import write_csv, write_text  # noqa: E402

out_dir = Path(snakemake.output[0]).parent
excluded = excluded_slides(snakemake.input.features).drop_duplicates("slide_id")
write_csv(out_dir / "excluded.csv", excluded)
if len(excluded):
    md = out_dir / "summary.md"
    lines = [f"- `{r.slide_id}`: {r.reason}" for r in excluded.itertuples()]
    write_text(md, md.read_text().rstrip("\n") + f"\n\n## Excluded slides ({len(excluded)})\n\n" + "\n".join(lines) + "\n")

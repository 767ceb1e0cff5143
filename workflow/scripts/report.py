from pathlib import Path

import _step

_step.start(snakemake)
from slidemil.cohort.facts import excluded_slides  # noqa: E402
from slidemil.files import write_csv, write_text  # noqa: E402
from slidemil.cohort.manifest import read_manifest  # noqa: E402
from slidemil.report.page import build_report  # noqa: E402

inp = snakemake.input
runs = [
    dict(run, predictions=pred, history=hist, checkpoint=ckpt)
    for run, pred, hist, ckpt in zip(snakemake.params.runs, inp.predictions, inp.histories, inp.checkpoints)
]
# One manifest per extractor, in the folder named after it; one for the tiles and QC pictures.
features = {Path(m).parent.name: read_manifest(m) for m in inp.features}
tiles = read_manifest(inp.tiles[0]) if inp.tiles else None
qc = read_manifest(inp.tiles[0], "qc") if inp.tiles else None
out_dir = Path(snakemake.output.html).parent
_step.run(
    build_report,
    runs,
    out_dir=str(out_dir),
    settings=snakemake.params.report,
    seed=snakemake.params.seed,
    sheet=inp.sheet,
    splits=inp.splits,
    features=features,
    tiles=tiles,
    qc=qc,
    device=snakemake.resources.device,
)

# Slides left out at tiling (broken, no mpp, no tissue) and why: a table and a section in summary.md.
excluded = excluded_slides([p for paths in features.values() for p in paths.values()]).drop_duplicates("slide_id")
write_csv(out_dir / "excluded.csv", excluded)
if len(excluded):
    md = out_dir / "summary.md"
    lines = [f"- `{r.slide_id}`: {r.reason}" for r in excluded.itertuples()]
    write_text(md, md.read_text().rstrip("\n") + f"\n\n## Excluded slides ({len(excluded)})\n\n" + "\n".join(lines) + "\n")

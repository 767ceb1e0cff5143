import _step

_step.start(snakemake)
from slidemil.cohort.splits import write_splits  # noqa: E402

s = snakemake.params.splits
_step.run(
    write_splits,
    snakemake.input.sheet,
    snakemake.output[0],
    folds=s["folds"],
    test_fraction=s["test_fraction"],
    seed=snakemake.params.seed,
    test_column=s.get("test_column"),
    binarize=s.get("binarize"),
    positive_class=s.get("positive_class"),
    **({"fold_column": s["fold_column"]} if s.get("fold_column") else {}),
)

from _step import run
from slidemil.cohort.splits import write_splits

s = snakemake.params.splits
run(
    snakemake,
    write_splits,
    snakemake.input.sheet,
    snakemake.output[0],
    manifest=snakemake.input.usable,
    folds=s["folds"],
    test_fraction=s["test_fraction"],
    seed=snakemake.params.seed,
    test_column=s.get("test_column"),
    binarize=s.get("binarize"),
    positive_class=s.get("positive_class"),
    **({"fold_column": s["fold_column"]} if s.get("fold_column") else {}),
)

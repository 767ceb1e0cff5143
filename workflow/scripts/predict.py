from _step import run
from slidemil.deploy.predict import predict_cohort

run(
    snakemake,
    predict_cohort,
    list(snakemake.input.checkpoints),
    snakemake.input.features,
    snakemake.input.sheet,
    snakemake.output.slides,
    snakemake.output.patients,
    training_manifest=snakemake.input.training,
    positive_class=snakemake.params.positive_class,
    endpoint=snakemake.params.endpoint,
    refit_checkpoint=snakemake.input.refit[0] if snakemake.input.refit else None,
    device=snakemake.resources.device,
    threads=snakemake.threads,
)

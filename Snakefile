# slidemil: whole-slide images + slide labels -> patient-level AUCs.
# The stages are in rules/, their code in workflow/slidemil/.
from snakemake.utils import min_version

min_version("8.0")


# Defaults next to this file; a run elsewhere overrides them with --configfile.
configfile: f"{workflow.basedir}/config/config.yaml"


# `snakemake --report report.zip` after a run: the report rule's figures, introduced by report/workflow.rst.
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/tiling.smk"
include: "rules/simclr.smk"
include: "rules/features.smk"
include: "rules/splits.smk"
include: "rules/train.smk"
include: "rules/tile_supervised.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        report_outputs(),

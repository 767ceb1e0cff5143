"""Names the DAG needs before torch is imported: SimCLR extractors and the architecture each shares.

A SimCLR extractor is a registered architecture (``shufflenet_v2``, ``resnet18``,
``resnet50_trunc``) whose weights come from SimCLR pre-training on the cohort's
own training tiles (``results/simclr/{architecture}/backbone.pt``).
"""

SIMCLR_EXTRACTORS = {
    "shufflenet_simclr": "shufflenet_v2",    # DeepSMILE, TCGA-BC
    "resnet18_simclr": "resnet18",           # DeepSMILE, TCGA-CRCk
    "resnet50_simclr": "resnet50_trunc",
}
# Weights setting that means "the cohort's own SimCLR backbone" (resolved by the workflow to a file).
SIMCLR_WEIGHTS = "simclr"

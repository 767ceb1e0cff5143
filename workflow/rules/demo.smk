if DEMO:

    rule demo_cohort:
        output:
            sheet=SHEET,
            slides=[SAMPLES.loc[s, "path"] for s in SLIDES],
        log:
            f"{LOGS}/demo_cohort.log",
        conda:
            "../envs/slidemil.yaml"
        threads: 2
        params:
            demo=config["demo"],
        script:
            "../scripts/demo_cohort.py"

if DEMO:

    rule demo_cohort:
        output:
            sheet=SHEET,
            slides=[SAMPLES.loc[s, "path"] for s in SLIDES],
        params:
            demo=config["demo"],
        threads: 2
        conda:
            "../envs/slidemil.yaml"
        log:
            f"{LOGS}/demo_cohort.log",
        script:
            "../scripts/demo_cohort.py"

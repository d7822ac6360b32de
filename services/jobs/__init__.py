"""Batch jobs: bootstrap (init) and materialisation, run by the CLI, a CronJob or the demo."""

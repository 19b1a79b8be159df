"""Prefect flows: one per DVC stage (what dvc.yaml's cmd runs) and the pipeline."""

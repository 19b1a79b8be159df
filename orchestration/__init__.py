"""Pipeline infrastructure: DVC stages run in-process, the workspace lock, the run report, a temporary Prefect API."""

"""Flow of the ingest_target stage; dvc.yaml runs it as `python -m flows.ingest_target`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.ingest_target import ingest_target

stage_task = ingest_target


@flow(name="ingest_target")
def ingest_target_flow(params_path: str | None = None) -> dict:
    return ingest_target(params_path)


if __name__ == "__main__":
    stage_main(ingest_target_flow)

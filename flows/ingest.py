"""Flow of the ingest stage; dvc.yaml runs it as `python -m flows.ingest`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.ingest import ingest

stage_task = ingest


@flow(name="ingest")
def ingest_flow(params_path: str | None = None) -> dict:
    return ingest(params_path)


if __name__ == "__main__":
    stage_main(ingest_flow)

"""Flow of the export stage; dvc.yaml runs it as `python -m flows.export`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.export import export

stage_task = export


@flow(name="export")
def export_flow(params_path: str | None = None) -> dict:
    return export(params_path)


if __name__ == "__main__":
    stage_main(export_flow)

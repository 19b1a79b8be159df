"""Flow of the prepare stage; dvc.yaml runs it as `python -m flows.prepare`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.prepare import prepare

stage_task = prepare


@flow(name="prepare")
def prepare_flow(params_path: str | None = None) -> dict:
    return prepare(params_path)


if __name__ == "__main__":
    stage_main(prepare_flow)

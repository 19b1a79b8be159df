"""Flow of the adapt stage; dvc.yaml runs it as `python -m flows.adapt`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.adapt import adapt

stage_task = adapt


@flow(name="adapt")
def adapt_flow(params_path: str | None = None) -> dict:
    return adapt(params_path)


if __name__ == "__main__":
    stage_main(adapt_flow)

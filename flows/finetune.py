"""Flow of the finetune stage; dvc.yaml runs it as `python -m flows.finetune`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.finetune import finetune

stage_task = finetune


@flow(name="finetune")
def finetune_flow(params_path: str | None = None) -> dict:
    return finetune(params_path)


if __name__ == "__main__":
    stage_main(finetune_flow)

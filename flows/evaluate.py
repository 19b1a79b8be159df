"""Flow of the evaluate stage; dvc.yaml runs it as `python -m flows.evaluate`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.evaluate import evaluate

stage_task = evaluate


@flow(name="evaluate")
def evaluate_flow(params_path: str | None = None) -> dict:
    return evaluate(params_path)


if __name__ == "__main__":
    stage_main(evaluate_flow)

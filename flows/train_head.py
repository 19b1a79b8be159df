"""Flow of the train_head stage; dvc.yaml runs it as `python -m flows.train_head`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.train_head import train_head

stage_task = train_head


@flow(name="train_head")
def train_head_flow(params_path: str | None = None) -> dict:
    return train_head(params_path)


if __name__ == "__main__":
    stage_main(train_head_flow)

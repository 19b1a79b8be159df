"""Flow of the features stage; dvc.yaml runs it as `python -m flows.features`."""

from __future__ import annotations

from prefect import flow

from orchestration.stage_main import stage_main
from tasks.features import features

stage_task = features


@flow(name="features")
def features_flow(params_path: str | None = None) -> dict:
    return features(params_path)


if __name__ == "__main__":
    stage_main(features_flow)

"""The features stage: the frozen backbone's features of every manifest item, extracted once and cached;
`python -m tasks.features` is its dvc.yaml cmd."""

from __future__ import annotations

from prefect import task

from orchestration.prefect_server import run_stage
from tlops.core import paths
from tlops.core.config import load_params
from tlops.data.manifest import load_manifest
from tlops.features.extract import extract_features
from tlops.tracking.runs import stage_run


@task(name="features")
def features(params_path: str | None = None) -> dict:
    """Extract the features of new items into features/cache and write features/dataset.npz."""
    params = load_params(params_path)
    with stage_run("features", params) as run:
        stats = extract_features(load_manifest(paths.MANIFEST), params, paths.FEATURES_DIR)
        run.set_tags({k: stats[k] for k in ("backbone", "weights_id", "engine")})
        rate = "texts_per_s" if "texts_per_s" in stats else "images_per_s"
        run.log_metrics({k: float(stats[k]) for k in ("extracted", "cached", "total", "decoded", "seconds", rate)})
    if rate == "texts_per_s":
        print(f"features: {stats['extracted']} extracted, {stats['cached']} cached, {stats['total']} rows "
              f"({stats['texts_per_s']} texts/s on {stats['engine']})")
    else:
        print(f"features: {stats['extracted']} extracted, {stats['cached']} cached, {stats['total']} rows, "
              f"{stats['decoded']} images decoded ({stats['images_per_s']} images/s on {stats['engine']})")
    return stats


stage_task = features

if __name__ == "__main__":
    run_stage(features)

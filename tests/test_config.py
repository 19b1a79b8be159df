"""params.yaml schema errors, and the agreement of params.yaml, tlops/config.py, tlops/paths.py and dvc.yaml."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from conftest import ROOT, run_cmd

from tlops.core import paths
from tlops.core.config import Params, dotted_get, flatten, load_params, parse_params
from tlops.core.errors import ConfigError

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS_YAML = yaml.safe_load((ROOT / "params.yaml").read_text())
# Written by tlops but deliberately outside DVC: run state and the MLflow store.
NOT_VERSIONED = {paths.STATE_DIR, paths.MLFLOW_DB, paths.MLFLOW_ARTIFACTS}


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_it_and_suggests_the_close_one():
    message = config_error({"finetune": {"lrr": 0.1}})
    assert "finetune.lrr is not a known key (did you mean finetune.lr?)" in message


def test_unknown_section_names_it():
    assert "finetnue is not a known key (did you mean finetune?)" in config_error({"finetnue": {}})


def test_wrong_type_names_the_key_and_the_value():
    message = config_error({"head": {"epochs": "many"}})
    assert message.startswith("params.yaml: head.epochs:") and "'many'" in message


@pytest.mark.parametrize(("raw", "key"), [
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({"head": {"dropout": 1.0}}, "head.dropout"),
    ({"export": {"opset": 5}}, "export.opset"),
    ({"serve": {"port": 70000}}, "serve.port"),
])
def test_out_of_range_value_names_the_key(raw: dict, key: str):
    assert f"params.yaml: {key}:" in config_error(raw)


def test_the_project_params_yaml_is_valid():
    parse_params(PARAMS_YAML)


def test_schema_defaults_are_the_values_of_params_yaml_and_it_lists_every_key():
    defaults, project = flatten(Params()), flatten(parse_params(PARAMS_YAML))
    assert {k: (v, project.get(k)) for k, v in defaults.items() if project.get(k) != v} == {}

    def keys(d: dict, prefix: str = "") -> set[str]:
        return set().union(*[keys(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "env" else {f"{prefix}{k}"}
                             for k, v in d.items()])

    schema_keys = {k for k in defaults if not k.startswith("schedule.env.")} | {"schedule.env"}
    assert schema_keys - keys(PARAMS_YAML) == set(), "keys params.yaml leaves to a schema default"


def _dvc_param_keys() -> list[str]:
    keys = []
    for stage in DVC_YAML["stages"].values():
        for entry in stage.get("params", []):
            keys += [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks]
    return keys


def _yaml_get(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("key", _dvc_param_keys())
def test_every_params_key_in_dvc_yaml_exists_in_params_yaml_and_the_schema(key: str):
    _yaml_get(PARAMS_YAML, key)  # KeyError if params.yaml lacks it
    dotted_get(Params(), key)  # KeyError if the schema lacks it


def test_a_stage_command_with_a_misspelled_key_exits_2_with_one_line_naming_it(workspace: Path):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["data"]["min_per_clas"] = params["data"].pop("min_per_class")
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_cmd([sys.executable, "-m", "tasks.prepare"], workspace, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "data.min_per_clas is not a known key (did you mean data.min_per_class?)" in lines[0]


def _entries(items: list) -> list[str]:
    return [item if isinstance(item, str) else next(iter(item)) for item in items]


def _dvc_outs() -> set[PurePosixPath]:
    outs = set()
    for stage in DVC_YAML["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            outs |= {PurePosixPath(p) for p in _entries(stage.get(kind, []))}
    return outs


def _paths_constants() -> dict[str, PurePosixPath]:
    return {name: PurePosixPath(v.as_posix()) for name, v in vars(paths).items() if isinstance(v, Path)}


def test_every_dvc_yaml_output_is_named_in_tlops_paths():
    named = set(_paths_constants().values())
    assert sorted(str(o) for o in _dvc_outs() - named) == []


def test_every_tlops_path_is_a_dvc_output_or_inside_one_unless_deliberately_unversioned():
    outs = _dvc_outs()
    unversioned = {PurePosixPath(p.as_posix()) for p in NOT_VERSIONED}
    stray = [f"{name}={p}" for name, p in _paths_constants().items()
             if p not in unversioned and not any(p == o or o in p.parents for o in outs)]
    assert stray == []


def test_top_level_plots_lie_in_stage_outputs():
    outs = _dvc_outs()
    plots = [PurePosixPath(p) for p in _entries(DVC_YAML.get("plots", []))]
    assert [str(p) for p in plots if not any(p == o or o in p.parents for o in outs)] == []


def test_set_params_keeps_comments_validates_first_and_writes_atomically(tmp_path: Path):
    from tlops.core.config import set_params

    p = tmp_path / "params.yaml"
    p.write_text("# the team's notes\nadapt:\n  method: none  # off until a target exists\n  target: null\n")
    params = set_params({"adapt.target": "/data/logged", "adapt.method": "auto", "serve.port": 9000}, p)
    text = p.read_text()
    assert "# the team's notes" in text and "# off until a target exists" in text
    assert (params.adapt.target, params.adapt.method, params.serve.port) == ("/data/logged", "auto", 9000)
    assert load_params(p) == params
    before = p.read_text()
    with pytest.raises(ConfigError, match="adapt.methd is not a known key"):
        set_params({"adapt.methd": "auto"}, p)
    assert p.read_text() == before  # nothing written

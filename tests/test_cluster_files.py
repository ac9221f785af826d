"""Every cluster file in the repository passes Ray's own launcher validation."""

import copy
import glob
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_FILES = sorted(glob.glob(os.path.join(ROOT, "cluster*.yaml")))


def validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config fills the provider's defaults (validating the raw YAML fails on a missing
    # internal key), then the launcher's JSON schema and its own consistency checks run.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_there_are_cluster_files():
    names = {os.path.basename(p) for p in CLUSTER_FILES}
    assert {"cluster.yaml", "cluster.local.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=os.path.basename)
def test_cluster_file_validates(path):
    with open(path) as f:
        config = yaml.safe_load(f)
    validate(config)
    # What users rely on: the repository and the auth token reach every node, vidtune is
    # installed there, and token auth is on for every `ray start`.
    assert config["file_mounts"]["~/vidtune"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("pip install" in c and "vidtune" in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("mlflow server" in c and "postgresql://" in c for c in config["head_start_ray_commands"])


def test_validation_catches_a_schema_error():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    config["available_node_types"]["gpu_spot"]["min_wrkers"] = 1  # a typo users make
    with pytest.raises(Exception, match="min_wrkers"):
        validate(config)

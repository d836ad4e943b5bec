"""cluster/gpu.yaml passes the checks `ray up` makes before it contacts any cloud (offline)."""

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.support import REPO

YAML = REPO / "cluster" / "gpu.yaml"


def load():
    return yaml.safe_load(YAML.read_text())


def test_gpu_cluster_yaml_validates_against_rays_schema():
    cfg = prepare_config(load())
    validate_config(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert all(isinstance(c, str) for c in cfg["head_start_ray_commands"] + cfg["setup_commands"])
    assert "constraints.txt" in " ".join(cfg["setup_commands"])


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(setup_comands=c.pop("setup_commands")),
    lambda c: c["available_node_types"]["gpu_h100"].pop("node_config"),
    lambda c: c.update(head_node_type="nope"),
])
def test_the_validator_catches_broken_copies(mutate):
    cfg = copy.deepcopy(load())
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(cfg))

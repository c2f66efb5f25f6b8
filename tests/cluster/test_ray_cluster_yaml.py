"""ray_cluster.yaml validates offline: Ray's shipped JSON schema and Ray's own config checks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(ray.autoscaler.__file__).with_name("ray-schema.json")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_matches_the_schema_shipped_in_the_ray_wheel(config: dict) -> None:
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))


def test_ray_prepares_and_validates_it(config: dict) -> None:
    prepared = prepare_config(copy.deepcopy(config))  # merges AWS defaults, checks docker
    validate_config(prepared)  # schema + node-type and min/max-worker rules
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head_cpu"
    assert types["head_cpu"]["max_workers"] == 0
    assert sum(t["min_workers"] for t in types.values()) <= prepared["max_workers"]
    # setup_commands run on both head and workers after Ray merges them
    assert any("auralink_aic-" in c for c in prepared["worker_setup_commands"])


def test_cpu_head_and_l4_and_h100_workers(config: dict) -> None:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    by_instance = {t["node_config"]["InstanceType"]: t for t in types.values()}
    assert by_instance["g6.xlarge"]["resources"]["GPU"] == 1  # NVIDIA L4
    assert by_instance["p5.48xlarge"]["resources"]["GPU"] == 8  # NVIDIA H100
    for t in (by_instance["g6.xlarge"], by_instance["p5.48xlarge"]):
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]


def test_images_and_pins_match_the_project(config: dict) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    ray_pin = re.search(r'"ray\[serve\]==([^"]+)"', pyproject).group(1)
    docker = config["docker"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-py311-cu\d+", docker["worker_image"])
    assert docker["head_image"].startswith(f"rayproject/ray:{ray_pin}-py311")
    setup = " ".join(config["setup_commands"])
    assert f"torch=={torch_pin}" in setup
    assert "/home/ray/dist/auralink_aic-*.whl" in setup
    assert config["file_mounts"]["/home/ray/dist"] == "./dist"
    for local in config["file_mounts"].values():  # what `ray up` copies from the repo root
        assert local.startswith("./")
    assert (ROOT / config["file_mounts"]["/home/ray/serve_config.yaml"]).is_file()


def test_tls_hook_precedes_every_ray_start(config: dict) -> None:
    setup = " ".join(config["setup_commands"])
    assert "auralink certs --ca-dir /home/ray/auralink-ca" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert start.index("ray-tls.env") < start.index("ray start"), key


def test_validation_catches_a_broken_config(config: dict) -> None:
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_l4"]["max_worker"] = 3  # typo for max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(bad, json.loads(SCHEMA.read_text()))
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "head_gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


def test_bridge_node_type_opens_what_its_workers_bind_and_announces_its_public_ip(config: dict) -> None:
    from sfu_bridge.fleet import BRIDGE_RESOURCE

    bridge = config["available_node_types"]["bridge_cpu"]
    res = bridge["resources"]
    assert res.get("GPU", 0) == 0 and res[BRIDGE_RESOURCE] == res["CPU"]  # one worker per vCPU
    assert 1 <= bridge["min_workers"] <= bridge["max_workers"] <= config["max_workers"]
    other = [t for n, t in config["available_node_types"].items() if n != "bridge_cpu"]
    assert all(BRIDGE_RESOURCE not in t["resources"] for t in other)  # workers land only here
    rules = {r["IpProtocol"]: r for r in config["provider"]["security_group"]["IpPermissions"]}
    init = " ".join(bridge["initialization_commands"])
    lo, hi = re.search(r'ip_local_port_range="(\d+) (\d+)"', init).groups()
    assert (rules["udp"]["FromPort"], rules["udp"]["ToPort"]) == (int(lo), int(hi))  # media
    assert rules["tcp"]["ToPort"] - rules["tcp"]["FromPort"] + 1 >= res[BRIDGE_RESOURCE]  # a port each
    # the node's public IPv4 reaches the workers' environment as AURALINK_PUBLIC_IP
    assert "meta-data/public-ipv4" in init and "AURALINK_PUBLIC_IP=" in init
    env_file = re.search(r"tee (\S+)", init).group(1)
    assert bridge["docker"]["worker_run_options"] == [f"--env-file {env_file}"]
    assert config["file_mounts"]["/home/ray/auralink-secret"] == "./secrets"


def test_media_workers_run_at_nice_0(config: dict) -> None:
    """Ray starts its workers at nice 15: the codec replicas and bridge workers would stall
    behind any other process of the node. Every `ray start` (cloud and `auralink up`) sets 0."""
    from cluster.up import _ray_env

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "export RAY_worker_niceness=0;" in start.split("ray start")[0], key
    assert _ray_env()["RAY_worker_niceness"] == "0"

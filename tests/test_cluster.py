"""Running panseg on a Ray cluster: the launcher config, resource checks, and `ray job submit` of each
stage on a two-node cluster started here with `ray start`, including losing a node during training."""

import copy
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from panseg.cluster import Capacity, node_types_of_launcher_config, unmet_requirements
from panseg.data_pipeline import task_cpus

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# ----------------------------------------------------------------------------------------------
# cluster.yaml (no Ray started)
# ----------------------------------------------------------------------------------------------


def _launcher_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_own_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher_config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` fills it with the AWS defaults
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-worker"]["resource"] = {"GPU": 1}  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_has_cpu_and_gpu_workers_a_shared_store_and_a_private_dashboard():
    config = _launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert head["resources"] == {"CPU": 0}  # no work on the head
    gpu = types["gpu-worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["node_config"]["InstanceType"].startswith("g5.")
    assert types["cpu-worker"]["resources"].get("GPU", 0) == 0
    for node_type in (types["cpu-worker"], gpu):
        assert 0 == node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in yaml.safe_dump(config)
    assert any("/mnt/panseg" in c for c in config["initialization_commands"])  # the shared file system
    assert "-v /mnt/panseg:/mnt/panseg" in config["docker"]["run_options"]
    assert any("pip install" in c and "panseg" in c for c in config["setup_commands"])


def test_capacity_of_an_autoscaling_cluster_counts_the_nodes_it_may_add():
    types = node_types_of_launcher_config(ROOT / "cluster.yaml")
    assert sorted(types, key=str) == sorted([({"CPU": 16.0, "memory": 100.0 * GiB}, 8),
                                            ({"CPU": 8.0, "GPU": 1.0, "memory": 24.0 * GiB}, 4)], key=str)
    shapes = (({"CPU": 0.0}),) + tuple(r for r, _ in types)
    capacity = Capacity(shapes, {"CPU": 8 * 16 + 4 * 8.0, "GPU": 4.0, "memory": 8 * 100.0 * GiB + 4 * 24.0 * GiB},
                        autoscaling=True)
    gpu_worker = {"CPU": 1.0, "GPU": 1.0}
    assert unmet_requirements([gpu_worker] * 4, capacity, "training worker") == []
    assert unmet_requirements([gpu_worker] * 5, capacity, "training worker") == [
        "5 training workers need 5 GPU in all, but the cluster can grow to 4 GPU"]
    [problem] = unmet_requirements([{"CPU": 1.0, "memory": 120.0 * GiB}], capacity, "preprocessing task")
    assert problem == ("each preprocessing task asks for 1 CPU, 120.0 GiB memory on one node, but no node type "
                       "has that (the most any node has: 16 CPU, 100.0 GiB memory)")
    assert node_types_of_launcher_config(ROOT / "no-such.yaml") == []


def test_a_worker_must_fit_on_one_node_not_only_in_the_totals():
    two_small = Capacity(({"CPU": 2.0}, {"CPU": 2.0}), {"CPU": 4.0})
    assert unmet_requirements([{"CPU": 2.0}] * 2, two_small, "training worker") == []
    assert unmet_requirements([{"CPU": 3.0}], two_small, "training worker") == [
        "each training worker asks for 3 CPU on one node, but no node has that (the most any node has: 2 CPU)"]
    assert len(unmet_requirements([{"CPU": 1.0, "GPU": 1.0}], two_small, "training worker")) == 2


def test_preprocessing_cpus_grow_with_the_memory_a_case_needs():
    per_cpu = 4 * GiB
    assert task_cpus(256 * 2**20, per_cpu) == 1  # small cases: one CPU each, many at once
    assert task_cpus(4 * GiB, per_cpu) == 1
    assert task_cpus(10 * GiB, per_cpu) == 3  # a case that takes the memory of 2.5 CPUs gets 3 as threads
    assert task_cpus(100 * GiB, per_cpu) == 8  # capped
    assert task_cpus(10 * GiB, 0.0) == 1  # a cluster that reports no memory

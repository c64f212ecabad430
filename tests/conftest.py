"""Shared fixtures: a local Ray for the tests that need one, small phantom cohorts (and a store made
without Ray), and the tiny preset with an untrained checkpoint of its network."""

import os

import pytest

# Before Ray is imported anywhere: no auth token, no usage reporting (DESIGN.md, "Ray on these machines").
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance with 2 CPUs for the whole test session, shut down at the end."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """6 diseased + 2 healthy small phantom cases with complete truth labels."""
    from panseg.phantom.cohort import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root / "raw", cases=6, healthy=2, seed=0, small=True, truth_dir=root / "truth")
    return root


@pytest.fixture(scope="session")
def tiny_store(ray_local, small_cohort):
    """The small cohort preprocessed with the tiny preset (shared by pipeline and training tests)."""
    from panseg.config import preset
    from panseg.data_pipeline import run_preprocessing

    store = small_cohort / "store.zarr"
    result = run_preprocessing(small_cohort / "raw", store, preset("tiny").preprocess, progress=False)
    return small_cohort, store, result


@pytest.fixture(scope="session")
def local_store(tmp_path_factory):
    """2 diseased + 1 healthy small phantoms preprocessed with the tiny preset in this process, without
    Ray (for training tests that must not start a cluster)."""
    from panseg.config import preset
    from panseg.data_pipeline import process_one
    from panseg.io import discover_cohort
    from panseg.phantom.cohort import write_cohort
    from panseg.store.zarr_store import create_store, write_manifest

    root = tmp_path_factory.mktemp("local_cohort")
    write_cohort(root / "raw", cases=2, healthy=1, seed=0, small=True)
    store, cfg = root / "store.zarr", preset("tiny").preprocess
    create_store(store, cfg)
    rows = [process_one(case, str(store), cfg) for case in discover_cohort(root / "raw").valid]
    assert all(r["status"] == "ok" for r in rows), rows
    write_manifest(store, rows)
    return store


@pytest.fixture(scope="module")
def tiny_cfg():
    from panseg.config import preset

    return preset("tiny")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_cfg):
    """The tiny preset's network, seeded and untrained, saved as RUN/model_final."""
    import torch

    from panseg.training.checkpoint import TrainingState, save_checkpoint
    from panseg.training.parts import make_model

    torch.manual_seed(0)
    model = make_model(tiny_cfg)
    return save_checkpoint(TrainingState(tiny_cfg, 0, model.state_dict(), None, None),
                           tmp_path_factory.mktemp("run") / "model_final")

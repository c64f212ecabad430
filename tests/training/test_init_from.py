"""`train.init_from` (panseg.training.init_from): a new run starts from another model's weights, its
heads resized to the new class count; another network is refused, naming the setting that differs."""

import pytest
import torch

from panseg.config import build_config
from panseg.training.checkpoint import TrainingState, save_checkpoint
from panseg.training.init_from import InitFromError, initialise_from, load_init_source
from panseg.training.parts import make_model


def _organ_run(tmp_path, *overrides):
    """RUN/model_best of a seeded, untrained organ model (14 classes) of the tiny network."""
    cfg = build_config("tiny", overrides=["preprocess.task=organs", *overrides])
    torch.manual_seed(1)
    model = make_model(cfg)
    save_checkpoint(TrainingState(cfg, 5, model.state_dict(), None, 0.5), tmp_path / "organ_run" / "model_best")
    return tmp_path / "organ_run", model.state_dict()


def test_weights_are_copied_and_the_heads_resized_to_the_tumor_classes(tmp_path):
    run, organ = _organ_run(tmp_path)
    cfg = build_config("tiny", overrides=[f"train.init_from={run}"])  # tumor task: 15 classes
    torch.manual_seed(2)
    model = make_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    result = initialise_from(model, load_init_source(run, cfg), run)
    tumor = model.state_dict()

    heads = sorted(k for k in tumor if k.startswith("heads."))
    assert len(heads) == 6  # 3 heads (final + 2 deep supervision), weight and bias each
    assert result.resized_heads == tuple(k for k in tumor if k.startswith("heads."))
    assert (result.source_classes, result.classes, result.copied) == (14, 15, len(tumor) - 6)
    for key in tumor:
        if key in heads:
            assert tumor[key].shape[0] == 15 and organ[key].shape[0] == 14
            assert torch.equal(tumor[key][:14], organ[key])  # background and the 13 organs: the organ model's
            assert torch.equal(tumor[key][14], fresh[key][14])  # the tumor row: this run's initialisation
        else:
            assert torch.equal(tumor[key], organ[key]), key
    assert "14 to 15 classes" in result.describe() and "model_best" in result.describe()


def test_the_same_class_count_copies_every_tensor(tmp_path):
    run, organ = _organ_run(tmp_path)
    cfg = build_config("tiny", overrides=["preprocess.task=organs"])
    model = make_model(cfg)
    result = initialise_from(model, load_init_source(run, cfg), run)
    assert result.resized_heads == () and all(torch.equal(v, organ[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("override, fragment", [
    ("model.features_per_stage=[4, 8, 16, 32]",
     "has model.features_per_stage=(8, 16, 32, 64), but this run's has (4, 8, 16, 32)"),
    ("model.strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]", "model.strides (as resolved"),
    ("model.n_conv_per_stage=1", "model.n_conv_per_stage=2, but this run's has 1"),
])
def test_another_network_is_refused_naming_the_setting(tmp_path, override, fragment):
    run, _ = _organ_run(tmp_path)
    cfg = build_config("tiny", overrides=[override])
    with pytest.raises(InitFromError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_init_source(run, cfg)


def test_a_tensor_of_another_shape_is_refused_naming_it(tmp_path):
    run, _ = _organ_run(tmp_path)
    cfg = build_config("tiny")
    source = load_init_source(run, cfg)
    damaged = dict(source.model)
    damaged["encoder.0.0.conv.weight"] = torch.zeros(3, 1, 3, 3, 3)
    with pytest.raises(InitFromError, match=r"encoder.0.0.conv.weight has shape \(3, 1, 3, 3, 3\) there"):
        initialise_from(make_model(cfg), TrainingState(source.cfg, 0, damaged, None, None), run)

"""Config: presets, strict loading, overrides and round trips."""

import json

import pytest

from panseg.config import (
    PRESETS,
    ConfigError,
    PansegConfig,
    build_config,
    config_from_json,
    config_to_json,
    label_names,
    load_config,
    preset,
    save_config,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_every_preset_round_trips_through_a_file(tmp_path, name, suffix):
    cfg = preset(name)
    path = save_config(cfg, tmp_path / f"cfg{suffix}")
    assert load_config(path) == cfg
    assert config_from_json(config_to_json(cfg)) == cfg


def test_presets_carry_the_design_numbers():
    paper, seed, nnunet = preset("paper"), preset("seed-code"), preset("nnunet")
    assert paper.preprocess.target_spacing_zyx_mm == (1.6, 1.2859, 1.2859)
    assert paper.preprocess.clip_hu == (-160.0, 240.0)
    assert paper.preprocess.crop_threshold_hu == 50.0 and paper.preprocess.crop_connectivity == 6
    assert paper.train.patch_size_zyx == (96, 128, 160) and paper.train.batch_size == 2
    assert (paper.train.optimizer, paper.train.lr, paper.train.weight_decay) == ("adamw", 1e-2, 1e-5)
    assert (paper.train.lr_schedule, paper.train.lr_step_epochs, paper.train.lr_step_factor) == ("step", 200, 0.5)
    assert (paper.train.alpha_dice, paper.train.alpha_ce, paper.train.tumor_weight) == (0.5, 0.5, 5.0)
    assert paper.infer.step_fraction == 0.875 and paper.infer.gaussian_sigma_scale == 0.125
    assert (seed.train.optimizer, seed.train.weight_decay, seed.train.lr_schedule) == ("sgd", 3e-5, "poly")
    assert (seed.train.alpha_dice, seed.train.alpha_ce) == (1.0, 1.0)
    assert nnunet.train.tumor_weight == 1.0 and nnunet.train.random_patch_fraction == pytest.approx(0.67)
    assert paper.model.features_per_stage == (32, 64, 128, 256, 320, 320)


def test_unknown_key_is_an_error_naming_it_and_the_choices(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.learning_rate" in message and "lr" in message and "batch_size" in message


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"trian": {"lr": 0.1}}))
    with pytest.raises(ConfigError, match="'trian'.*did you mean 'train'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=fast", "train.lr must be a finite number"),
        ("train.batch_size=2.5", "train.batch_size must be an integer"),
        ("train.optimizer=adam", "train.optimizer must be one of 'adamw', 'sgd'"),
        ("train.patch_size_zyx=[96,128]", "must have 3 values"),
        ("train.augment.p_mirror=1.5", "probability"),
        ("infer.mirror_tta=yes please", "true or false"),
        ("preprocess.clip_hu=[240,-160]", "low < high"),
        ("tune.search_space=[{key: train.lr, low: 1, high: 1}]", "empty range"),
        ("tune.search_space=[{key: train.nope, low: 1, high: 2}]", "train.nope"),
        ("tune.search_space=[{key: train.optimizer, low: 1, high: 2}]", "not a numeric config key"),
        ("lr", "section.key=value"),
        ("train.lr_schedule=poly_time", "poly_time decays over train.time_limit_minutes, which is null"),
        ("train.snapshot_minutes=[5, 0]", "train.snapshot_minutes must all be > 0"),
    ],
)
def test_wrong_values_are_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        build_config("tiny", overrides=[override])


def test_overrides_apply_in_order_on_the_file_on_the_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\ntrain:\n  lr: 0.5\n  epochs: 7\n")
    cfg = build_config(config_file=path, overrides=["train.lr=0.25", "model.features_per_stage=[4, 8, 16]"])
    assert cfg.preset == "tiny"
    assert cfg.train.lr == 0.25 and cfg.train.epochs == 7
    assert cfg.train.patch_size_zyx == preset("tiny").train.patch_size_zyx  # untouched keys keep the preset's
    assert cfg.model.features_per_stage == (4, 8, 16)


def test_configs_are_frozen():
    cfg = PansegConfig()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_ints_are_accepted_as_floats_but_bools_are_not_numbers():
    assert build_config("paper", overrides=["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.lr must be a finite number, but it is True"):
        build_config("paper", overrides=["train.lr=true"])
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        build_config("paper", overrides=["train.epochs=false"])


def test_label_names_follow_the_task():
    tumor, organs = label_names("tumor"), label_names("organs")
    assert len(tumor) == 15 and tumor[14] == "tumor" and tumor[1] == "liver" and tumor[13] == "left_kidney"
    assert len(organs) == 14 and 14 not in organs
    assert preset("paper").preprocess.num_classes == 15


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML follows YAML 1.1 and reads 1e-4 as a string; users write it anyway.
    assert build_config("paper", overrides=["train.lr=1e-4"]).train.lr == 1e-4
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  weight_decay: 3e-5\n")
    assert build_config(config_file=path).train.weight_decay == 3e-5
    with pytest.raises(ConfigError, match="finite number"):
        build_config("paper", overrides=["train.lr=nan"])


def test_the_demo_recipe_decays_its_learning_rate_over_its_minutes_or_its_epochs():
    from panseg.demo import demo_config
    from panseg.training.parts import lr_at_epoch

    cfg = demo_config(minutes=5.0)
    assert (cfg.train.lr_schedule, cfg.train.time_limit_minutes) == ("poly_time", 5.0)
    assert (cfg.train.tumor_weight, cfg.train.tumor_sampling_ratio) == (5.0, 5.0)  # the paper's
    # The clock, not the epoch, sets the rate: 1e-2 at the start, (1 - 0.5) ** 0.9 of it half-way, 0 at the end.
    assert lr_at_epoch(cfg.train, 50, 0.0) == 1e-2
    assert lr_at_epoch(cfg.train, 0, 150.0) == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert lr_at_epoch(cfg.train, 0, 300.0) == 0.0
    untimed = demo_config(minutes=None).train
    assert (untimed.lr_schedule, untimed.time_limit_minutes, untimed.epochs) == ("poly", None, 32)
    assert 0 < lr_at_epoch(untimed, untimed.epochs - 1) < 1e-3
    assert demo_config(epochs=7, minutes=3.0).train.epochs == 7

"""Frozen, validated configuration for every panseg stage, with presets and strict loading.

A config is a tree of frozen dataclasses (`PansegConfig` at the root). It comes from a preset
(`paper`, `seed-code`, `nnunet`, `tiny`), optionally a YAML/JSON file, and `--set section.key=value`
overrides. Unknown keys and values of the wrong type are errors that name the key and the valid
choices; nothing is silently ignored.

This module is the bottom of the import graph: it imports nothing from panseg.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import yaml

# ----------------------------------------------------------------------------------------------
# Label ids (FLARE22 organs 1-13, tumor 14): one definition used by every stage.
# ----------------------------------------------------------------------------------------------

ORGAN_NAMES: tuple[str, ...] = (
    "liver",
    "right_kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior_vena_cava",
    "right_adrenal_gland",
    "left_adrenal_gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left_kidney",
)
ORGAN_IDS: tuple[int, ...] = tuple(range(1, len(ORGAN_NAMES) + 1))  # 1..13
TUMOR_ID = 14
BACKGROUND_ID = 0

Task = Literal["tumor", "organs"]


def label_names(task: str) -> dict[int, str]:
    """Class id -> name for a task: `organs` has ids 0-13, `tumor` (fused) has 0-14."""
    names = {BACKGROUND_ID: "background"}
    names.update({i: n for i, n in zip(ORGAN_IDS, ORGAN_NAMES)})
    if task == "tumor":
        names[TUMOR_ID] = "tumor"
    elif task != "organs":
        raise ValueError(f"task must be 'tumor' or 'organs', but it is {task!r}")
    return names


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and what is allowed."""


# ----------------------------------------------------------------------------------------------
# Stage configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    task: Task = "tumor"  # tumor: fuse organ pseudo-labels 1-13 with tumor 14; organs: labels are 1-13
    target_spacing_zyx_mm: tuple[float, float, float] = (1.6, 1.2859, 1.2859)  # paper, section 2.1
    clip_hu: tuple[float, float] = (-160.0, 240.0)  # paper; scaled to [0, 1] on read
    crop_method: Literal["largest_component", "body", "threshold_bbox", "none"] = "largest_component"  # paper
    crop_threshold_hu: float = 50.0  # paper: raw HU > 50
    crop_connectivity: Literal[6, 18, 26] = 6  # released code: 6-connectivity
    crop_margin_vox: int = 0  # released code: no margin
    crop_grow_to_labels: bool = True  # training crops never cut a labelled voxel (DESIGN.md)
    body_threshold_hu: float = -500.0  # body = largest component above this (excludes air and table)
    min_body_fraction: float = 0.5  # crop box must hold this much of the body, else use the body box
    body_lost_warn_fraction: float = 0.05  # warn, naming the case, when a crop leaves out more of the body
    image_interpolation: Literal["bspline", "linear"] = "bspline"  # paper: cubic
    label_interpolation: Literal["nearest", "label_gaussian"] = "nearest"
    max_locations_per_class: int = 10_000  # sampled voxel coordinates stored per present class
    chunk_zyx: tuple[int, int, int] = (64, 64, 64)  # Zarr chunk: about one patch read
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("preprocess.target_spacing_zyx_mm", self.target_spacing_zyx_mm)
        if not self.clip_hu[0] < self.clip_hu[1]:
            raise ConfigError(f"preprocess.clip_hu must be (low, high) with low < high, but it is {self.clip_hu}")
        if self.crop_margin_vox < 0:
            raise ConfigError(f"preprocess.crop_margin_vox must be >= 0, but it is {self.crop_margin_vox}")
        if not 0.0 <= self.min_body_fraction <= 1.0:
            raise ConfigError(f"preprocess.min_body_fraction must be in [0, 1], but it is {self.min_body_fraction}")
        if not 0.0 <= self.body_lost_warn_fraction <= 1.0:
            raise ConfigError("preprocess.body_lost_warn_fraction must be in [0, 1], but it is "
                              f"{self.body_lost_warn_fraction}")
        if self.max_locations_per_class < 1:
            raise ConfigError("preprocess.max_locations_per_class must be >= 1")
        _check_positive("preprocess.chunk_zyx", self.chunk_zyx)

    @property
    def num_classes(self) -> int:
        return len(label_names(self.task))


@dataclass(frozen=True)
class ModelConfig:
    features_per_stage: tuple[int, ...] = (32, 64, 128, 256, 320, 320)  # nnU-Net default 3d_fullres
    n_conv_per_stage: int = 2
    kernel_size: int = 3
    strides: tuple[tuple[int, int, int], ...] | None = None  # None: planned from patch and spacing
    min_feature_map: int = 4  # nnU-Net planner: stop pooling an axis below this size
    deep_supervision: bool = True
    negative_slope: float = 0.01  # LeakyReLU

    def __post_init__(self) -> None:
        _check_positive("model.features_per_stage", self.features_per_stage)
        if len(self.features_per_stage) < 2:
            raise ConfigError("model.features_per_stage needs at least 2 stages")
        if self.strides is not None and len(self.strides) != len(self.features_per_stage):
            raise ConfigError(
                f"model.strides has {len(self.strides)} entries but model.features_per_stage has "
                f"{len(self.features_per_stage)}; give one stride per stage or leave strides null"
            )
        if self.kernel_size % 2 != 1:
            raise ConfigError(f"model.kernel_size must be odd, but it is {self.kernel_size}")


@dataclass(frozen=True)
class AugmentConfig:
    """nnU-Net's default augmentation probabilities and ranges (per sample)."""

    enabled: bool = True
    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.01)  # nnU-Net's 0.1 is a std on z-scored CT; ours is [0, 1]
    p_blur: float = 0.1  # nnU-Net: 0.2 per sample x 0.5 per channel
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.125  # nnU-Net: 0.25 per sample x 0.5 per channel
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)
    gamma_retain_stats: bool = True  # nnU-Net restores mean and std after gamma
    p_mirror: float = 0.5  # per axis

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("p_"):
                p = getattr(self, f.name)
                if not 0.0 <= p <= 1.0:
                    raise ConfigError(f"train.augment.{f.name} is a probability in [0, 1], but it is {p}")


@dataclass(frozen=True)
class TrainConfig:
    patch_size_zyx: tuple[int, int, int] = (96, 128, 160)  # paper, Table 2
    batch_size: int = 2  # per worker; paper: 2
    epochs: int = 500  # paper
    iterations_per_epoch: int = 250  # nnU-Net's epoch length; split across workers
    optimizer: Literal["adamw", "sgd"] = "adamw"  # paper: AdamW; released code and nnU-Net: SGD
    lr: float = 1e-2
    weight_decay: float = 1e-5
    momentum: float = 0.99  # SGD only (Nesterov)
    # poly: nnU-Net's decay over the epochs; poly_time: the same decay over the share of
    # train.time_limit_minutes used, so a time budget is used whole on any machine.
    lr_schedule: Literal["step", "poly", "poly_time", "constant"] = "step"
    lr_step_epochs: int = 200  # paper: halved every 200 epochs
    lr_step_factor: float = 0.5
    poly_exponent: float = 0.9
    grad_clip_norm: float = 12.0  # nnU-Net
    alpha_dice: float = 0.5  # paper eq. (3)
    alpha_ce: float = 0.5
    tumor_weight: float = 5.0  # loss weight of tumor relative to each organ (paper: 5)
    background_weight: float = 1.0
    dice_include_background: bool = False
    batch_dice: bool = True  # Dice over the whole batch (all DDP workers' together), as nnU-Net's 3d_fullres
    tumor_sampling_ratio: float = 5.0  # tumor is drawn this many times as often as each organ
    random_patch_fraction: float = 0.0  # share of patches centred anywhere, not on a class voxel
    # How far a patch's class voxel may lie from the patch centre, as a fraction of half the patch per
    # axis: 0 centres it, 1 puts it anywhere in the patch (panseg.training.sampling.voxel_position).
    class_voxel_offset: float = 0.0
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on GPU; CPU always runs fp32
    # Layout of the network's weights and activations in training. 'auto': channels-last on the CPU
    # (a training step ~1.5x faster there, bench/train_step.py), contiguous on GPU (as nnU-Net).
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    val_every_epochs: int = 5
    checkpoint_every_epochs: int = 5
    time_limit_minutes: float | None = None  # end the run (validated, final model) at the first epoch end past it
    # Training minutes at which RUN/snapshots/minute_M keeps the model (at the first epoch end past M).
    snapshot_minutes: tuple[float, ...] = ()
    # A panseg checkpoint or run (e.g. the stage-one organ model) whose weights a new run starts from,
    # heads resized to this run's classes (panseg.training.init_from); a resume takes its own checkpoint.
    init_from: str | None = None
    val_fraction: float = 0.2  # held-out share of labelled cases when the split file is created
    val_max_cases: int = 20  # at most this many held-out cases per validation
    loader_threads: int = 2  # threads reading patches from the store ahead of the step
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _check_positive("train.patch_size_zyx", self.patch_size_zyx)
        for name in ("batch_size", "epochs", "iterations_per_epoch", "val_every_epochs", "checkpoint_every_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, but it is {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, but it is {self.lr}")
        if self.tumor_weight <= 0 or self.tumor_sampling_ratio <= 0:
            raise ConfigError("train.tumor_weight and train.tumor_sampling_ratio must be > 0")
        if self.alpha_dice < 0 or self.alpha_ce < 0 or self.alpha_dice + self.alpha_ce == 0:
            raise ConfigError("train.alpha_dice and train.alpha_ce must be >= 0 and not both 0")
        if not 0.0 <= self.class_voxel_offset <= 1.0:
            raise ConfigError(f"train.class_voxel_offset must be in [0, 1], but it is {self.class_voxel_offset}")
        if not 0.0 <= self.random_patch_fraction <= 1.0:
            raise ConfigError(f"train.random_patch_fraction must be in [0, 1], but it is {self.random_patch_fraction}")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"train.time_limit_minutes must be > 0 (or null), but it is {self.time_limit_minutes}")
        if self.lr_schedule == "poly_time" and self.time_limit_minutes is None:
            raise ConfigError("train.lr_schedule=poly_time decays over train.time_limit_minutes, which is null")
        if any(m <= 0 for m in self.snapshot_minutes):
            raise ConfigError(f"train.snapshot_minutes must all be > 0, but they are {self.snapshot_minutes}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"train.val_fraction must be in (0, 1), but it is {self.val_fraction}")


@dataclass(frozen=True)
class InferConfig:
    step_fraction: float = 0.875  # paper: step 7/8 of the window
    gaussian_sigma_scale: float = 0.125  # sigma = window / 8
    windows_per_batch: int = 2
    mirror_tta: bool = False  # released code: no mirroring
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    all_labels: bool = False  # write every class, not only the tumor
    # torch.compile the network (infer.compile_network), at its first call in each process. Measured:
    # on an H200, bf16 windows 2.25x faster than eager (bench/gpu.py); on a 2-core CPU 0.73x MONAI's
    # time (bench/infer.py). Compiling takes seconds to a minute, so it pays over a folder of cases on
    # GPU, and on the CPU already for one case of the paper network. Needs Triton on GPU and a C++
    # compiler on the CPU.
    compile: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.step_fraction <= 1.0:
            raise ConfigError(f"infer.step_fraction must be in (0, 1], but it is {self.step_fraction}")
        if self.gaussian_sigma_scale <= 0:
            raise ConfigError("infer.gaussian_sigma_scale must be > 0")
        if self.windows_per_batch < 1:
            raise ConfigError("infer.windows_per_batch must be >= 1")


@dataclass(frozen=True)
class SearchDim:
    """One searched hyperparameter: a dotted config key and its range."""

    key: str
    low: float
    high: float
    log: bool = True

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ConfigError(f"tune.search_space: {self.key} has an empty range [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ConfigError(f"tune.search_space: {self.key} is log-scaled, so low must be > 0, but it is {self.low}")


@dataclass(frozen=True)
class TuneConfig:
    num_trials: int = 8
    search_space: tuple[SearchDim, ...] = (
        SearchDim("train.tumor_weight", 1.0, 10.0, True),
        SearchDim("train.tumor_sampling_ratio", 1.0, 10.0, True),
    )
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period_epochs: int = 1
    reduction_factor: int = 2
    metric: str = "val_tumor_dsc"
    mode: Literal["max", "min"] = "max"
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_trials < 1 or self.workers_per_trial < 1:
            raise ConfigError("tune.num_trials and tune.workers_per_trial must be >= 1")
        keys = [d.key for d in self.search_space]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"tune.search_space names a key twice: {keys}")


@dataclass(frozen=True)
class PansegConfig:
    preset: str = "paper"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        for dim in self.tune.search_space:
            _check_key_exists(self, dim.key, where="tune.search_space")


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def _paper() -> PansegConfig:
    return PansegConfig(preset="paper")


def _seed_code() -> PansegConfig:
    """The released code (lay-john/FLARE24-Task1): SGD + poly, CE + Dice at weight 1 each."""
    return PansegConfig(
        preset="seed-code",
        train=TrainConfig(
            optimizer="sgd", lr=1e-2, weight_decay=3e-5, momentum=0.99, lr_schedule="poly",
            alpha_dice=1.0, alpha_ce=1.0, random_patch_fraction=0.0,
        ),
        infer=InferConfig(mirror_tta=False, precision="fp32"),
    )


def _nnunet() -> PansegConfig:
    """nnU-Net v2 defaults on the paper's preprocessing: no class weights, 1/3 foreground patches."""
    return PansegConfig(
        preset="nnunet",
        train=TrainConfig(
            optimizer="sgd", lr=1e-2, weight_decay=3e-5, momentum=0.99, lr_schedule="poly", epochs=1000,
            alpha_dice=1.0, alpha_ce=1.0, tumor_weight=1.0, tumor_sampling_ratio=1.0,
            random_patch_fraction=0.67,
        ),
        infer=InferConfig(step_fraction=0.5, mirror_tta=True),
    )


def _tiny() -> PansegConfig:
    """Smoke runs on CPU: coarse spacing, a small patch and network, a few iterations."""
    return PansegConfig(
        preset="tiny",
        preprocess=PreprocessConfig(target_spacing_zyx_mm=(3.2, 2.5718, 2.5718), chunk_zyx=(32, 32, 32),
                                    max_locations_per_class=2000),
        model=ModelConfig(features_per_stage=(8, 16, 32, 64)),
        train=TrainConfig(
            patch_size_zyx=(32, 64, 64), batch_size=2, epochs=4, iterations_per_epoch=10, lr=3e-3,
            lr_schedule="constant", val_every_epochs=2, checkpoint_every_epochs=2, val_max_cases=4,
            precision="fp32",
        ),
        tune=TuneConfig(num_trials=4, workers_per_trial=1, cpus_per_worker=0.5),
    )


PRESETS: dict[str, typing.Callable[[], PansegConfig]] = {
    "paper": _paper,
    "seed-code": _seed_code,
    "nnunet": _nnunet,
    "tiny": _tiny,
}


def preset(name: str) -> PansegConfig:
    """The config of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# Strict conversion between dicts and dataclasses
# ----------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> Any:
    """A config as plain dicts, lists and scalars (JSON/YAML-safe)."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking every key and type.

    Raises:
        ConfigError: naming the key (dotted path) and what was expected.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, but it is {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(_unknown_key_message(unknown[0], names, where))
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field missing
        raise ConfigError(f"{where or 'config'}: {err}") from None


def merge(cfg: Any, data: dict, where: str = "") -> Any:
    """`cfg` with the keys in `data` replaced (nested dicts merge into nested dataclasses)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, but it is {type(data).__name__}")
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in fields(cfg)]
    changes = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(key, names, where))
        current = getattr(cfg, key)
        if is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, _join(where, key))
        else:
            changes[key] = _convert(hints[key], value, _join(where, key))
    return replace(cfg, **changes)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {options}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{where} must be one of {', '.join(repr(a) for a in args)}, but it is {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, but it is {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} values, but it has {len(value)}: {list(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, but it is {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, but it is {value!r}")
    if tp is float:
        if isinstance(value, str):
            value = _yaml_float(value)  # PyYAML reads 1e-4 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{where} must be a finite number, but it is {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, but it is {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")  # a bug in this module, not user input


def _yaml_float(text: str) -> float | str:
    """`'1e-4'` -> 1e-4; any other string comes back unchanged (and is then rejected as a number)."""
    try:
        return float(text) if any(c.isdigit() for c in text) else text
    except ValueError:
        return text


def _unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {_join(where, key)!r}{hint}; valid keys{' of ' + where if where else ''}: {', '.join(valid)}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_positive(name: str, values: tuple) -> None:
    if any(v <= 0 for v in values):
        raise ConfigError(f"{name} must be all > 0, but it is {tuple(values)}")


def _check_key_exists(cfg: Any, dotted: str, where: str) -> None:
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not is_dataclass(node):
            raise ConfigError(f"{where}: {dotted!r} is not a config key")
        names = [f.name for f in fields(node)]
        if part not in names:
            raise ConfigError(f"{where}: " + _unknown_key_message(part, names, ".".join(parts[:i])))
        node = getattr(node, part)
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise ConfigError(f"{where}: {dotted!r} is not a numeric config key")


# ----------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------


def parse_override(text: str) -> dict:
    """`'train.lr=0.001'` -> `{'train': {'lr': 0.001}}`; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"an override must look like section.key=value, but it is {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    node: dict = {}
    root = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


def build_config(
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> PansegConfig:
    """The config a CLI call means: a preset (or a file, whose `preset` key picks the base), then overrides.

    With both a preset and a file, the file's values are applied on top of the named preset.
    """
    data = read_config_file(config_file) if config_file else {}
    base_name = preset_name or data.get("preset") or "paper"
    cfg = preset(base_name)
    if data:
        data = dict(data)
        data.pop("preset", None)
        cfg = merge(cfg, data)
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return cfg


def apply_overrides(cfg: PansegConfig, config_file: str | Path | None = None,
                    overrides: typing.Sequence[str] = ()) -> PansegConfig:
    """`cfg` (e.g. a checkpoint's) with a config file's keys and then `--set` overrides applied."""
    if config_file:
        data = dict(read_config_file(config_file))
        data.pop("preset", None)
        cfg = merge(cfg, data)
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return cfg


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, but it holds {type(data).__name__}")
    return data


def load_config(path: str | Path) -> PansegConfig:
    """Load a full config saved by `save_config` (or written by hand), strictly."""
    return build_config(config_file=path)


def save_config(cfg: PansegConfig, path: str | Path) -> Path:
    """Write `cfg` as YAML (or JSON for a .json path), atomically."""
    path = Path(path)
    data = to_dict(cfg)
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def config_from_json(text: str) -> PansegConfig:
    """A full config from its JSON text (used to pass configs through Ray and into checkpoints)."""
    data = json.loads(text)
    return from_dict(PansegConfig, data)


def config_to_json(cfg: PansegConfig) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


__all__ = [
    "AugmentConfig", "BACKGROUND_ID", "apply_overrides", "ConfigError", "InferConfig", "ModelConfig", "ORGAN_IDS", "ORGAN_NAMES",
    "PRESETS", "PansegConfig", "PreprocessConfig", "SearchDim", "TUMOR_ID", "TrainConfig", "TuneConfig",
    "build_config", "config_from_json", "config_to_json", "from_dict", "label_names", "load_config", "merge",
    "parse_override", "preset", "read_config_file", "save_config", "to_dict",
]

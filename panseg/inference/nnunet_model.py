"""nnU-Net v2 trained-model folders: recognise one, read its plans, build its network, load its folds.

An nnU-Net v2 model folder is `<Trainer>__<Plans>__<configuration>/` holding `plans.json`,
`dataset.json` and one `fold_K/` (K = 0..4 or `all`) per trained fold with `checkpoint_final.pth`
(or `checkpoint_best.pth`). Everything panseg needs to predict like nnU-Net comes from there:

- `NnunetPlan`: the configuration's spacing, patch, normalisation, resampling orders and network, read
  from plans.json (configurations that `inherits_from` another are merged as nnU-Net merges them) and
  the label map of dataset.json;
- the network: nnU-Net's PlainConvUNet is panseg's own `UNet3D` (same layers, per-stage kernels), its
  weights renamed one to one; anything else (ResEnc U-Nets, other norms or activations) is refused
  with an error that names what cannot be built;
- checkpoints are read with `torch.load(weights_only=True)`. Real nnU-Net checkpoints also hold numpy
  scalars (np.float64 losses and Dice values in their `logging` entry, `_best_ema`), so exactly those
  numpy types are allowed (`NUMPY_CHECKPOINT_GLOBALS`); any other object makes the load fail with a
  message naming it. Nothing is ever unpickled as an arbitrary object.

Pure torch and JSON: no Ray.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from panseg.training.model import UNet3D

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")  # tried in this order, as nnU-Net's default
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
_CONV = "torch.nn.modules.conv.Conv3d"
_NORM = "torch.nn.modules.instancenorm.InstanceNorm3d"
_NONLIN = "torch.nn.LeakyReLU"
_FOLD = re.compile(r"^fold_(\d+|all)$")


def _numpy_checkpoint_globals() -> list:
    """numpy's scalar reconstructor under both the numpy 2 and the numpy 1 module name (checkpoints
    written with numpy 1 name `numpy.core.multiarray.scalar`), `numpy.dtype`, and the float and int
    dtype classes numpy 2 pickles beside them."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar  # numpy 1.x
    names = {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"}
    dtypes = np.dtypes
    return [*((scalar, name) for name in sorted(names)), np.dtype, dtypes.Float64DType, dtypes.Float32DType,
            dtypes.Int64DType, dtypes.Int32DType]


NUMPY_CHECKPOINT_GLOBALS = _numpy_checkpoint_globals()


class NnunetModelError(ValueError):
    """A folder is not an nnU-Net v2 model panseg can run (the message says what is wrong)."""


# ----------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------


def is_nnunet_model_folder(path: str | Path) -> bool:
    """Whether `path` is a folder with plans.json, dataset.json and at least one `fold_*` folder."""
    path = Path(path)
    return (path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()
            and any(_FOLD.match(p.name) for p in path.iterdir() if p.is_dir()))


def fold_checkpoints(folder: str | Path, folds: Sequence[str | int] | None = None) -> list[Path]:
    """The checkpoint file of each requested fold (`checkpoint_final.pth`, else `checkpoint_best.pth`).

    Args:
        folder: the model folder.
        folds: e.g. (0, 1, 2, 3, 4) or ('all',); None: every numbered fold that has a checkpoint (as
            nnU-Net's auto-detection, which leaves `fold_all` out), else `fold_all`.

    Raises:
        NnunetModelError: a requested fold has no checkpoint, or none was found.
    """
    folder = Path(folder)
    if folds is None:
        found = sorted((p for p in folder.glob("fold_*") if _FOLD.match(p.name) and p.name != "fold_all"),
                       key=lambda p: int(p.name[5:]))
        names = [p.name[5:] for p in found if _checkpoint_in(p)] or (["all"] if _checkpoint_in(folder / "fold_all")
                                                                      else [])
        if not names:
            raise NnunetModelError(f"{folder}: no fold_K/ folder holds {' or '.join(CHECKPOINT_NAMES)}")
        folds = names
    files = []
    for fold in folds:
        fold = str(fold)
        if not (fold == "all" or fold.isdigit()):
            raise NnunetModelError(f"fold {fold!r} is not a fold: give numbers (0 1 2 3 4) or 'all'")
        file = _checkpoint_in(folder / f"fold_{fold}")
        if file is None:
            raise NnunetModelError(f"{folder}: fold {fold} has no {' or '.join(CHECKPOINT_NAMES)} in fold_{fold}/")
        files.append(file)
    return files


def _checkpoint_in(fold_dir: Path) -> Path | None:
    for name in CHECKPOINT_NAMES:
        if (fold_dir / name).is_file():
            return fold_dir / name
    return None


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resampling:
    """One of nnU-Net's `resample_data_or_seg_to_shape` settings."""

    order: int
    order_z: int
    force_separate_z: bool | None


@dataclass(frozen=True)
class NnunetPlan:
    """What one configuration of plans.json (and dataset.json) says about predicting.

    Axes of `spacing`, `patch_size` and the network are the transposed ones (nnU-Net applies
    `transpose_forward` to the (z, y, x) array first).
    """

    configuration: str
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[dict, ...]  # per channel: mean, std, percentile_00_5, percentile_99_5
    data_resampling: Resampling
    probabilities_resampling: Resampling
    architecture: dict  # plans' `architecture` entry
    labels: dict[str, int]  # dataset.json's label map, name -> id

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return len(self.normalization_schemes)


def read_plan(folder: str | Path, configuration: str | None = None) -> NnunetPlan:
    """The plan of the folder's configuration (default: the last `__` part of the folder's name).

    Raises:
        NnunetModelError: unreadable JSON, an unknown or cascaded configuration, region-based labels,
            a 2D configuration, or a resampling function other than nnU-Net's default.
    """
    folder = Path(folder)
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    configuration = configuration or folder.name.split("__")[-1]
    config = _resolve_configuration(plans, configuration, folder)
    if config.get("previous_stage"):
        raise NnunetModelError(f"{folder}: configuration {configuration} is a cascade stage (it needs "
                               f"{config['previous_stage']}'s predictions as input); panseg runs single-stage models")
    if len(config["patch_size"]) != 3:
        raise NnunetModelError(f"{folder}: configuration {configuration} is 2D (patch {config['patch_size']}); "
                               "panseg runs 3D configurations")
    channels = len(dataset.get("channel_names", dataset.get("modality", {"0": "CT"})))
    fg = plans.get("foreground_intensity_properties_per_channel", {})
    return NnunetPlan(
        configuration=configuration,
        transpose_forward=tuple(int(a) for a in plans["transpose_forward"]),
        transpose_backward=tuple(int(a) for a in plans["transpose_backward"]),
        spacing=tuple(float(s) for s in config["spacing"]),
        patch_size=tuple(int(p) for p in config["patch_size"]),
        normalization_schemes=tuple(config["normalization_schemes"]),
        use_mask_for_norm=tuple(bool(u) for u in config["use_mask_for_norm"]),
        intensity_properties=tuple(fg.get(str(c), {}) for c in range(channels)),
        data_resampling=_resampling(config, "resampling_fn_data", folder),
        probabilities_resampling=_resampling(config, "resampling_fn_probabilities", folder),
        architecture=config["architecture"],
        labels=_labels(dataset, folder),
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise NnunetModelError(f"{path} is not readable JSON: {err}") from None


def _resolve_configuration(plans: dict, name: str, folder: Path, seen: tuple[str, ...] = ()) -> dict:
    configs = plans.get("configurations", {})
    if name not in configs:
        raise NnunetModelError(f"{folder}: plans.json has no configuration {name!r} (it has {sorted(configs)}); "
                               "the folder's name must end in __<configuration>")
    config = dict(configs[name])
    parent = config.get("inherits_from")
    if parent:
        if parent in seen:
            raise NnunetModelError(f"{folder}: configurations inherit in a circle: {' -> '.join(seen + (name,))}")
        config = {**_resolve_configuration(plans, parent, folder, seen + (name,)), **config}
    if "architecture" not in config:
        raise NnunetModelError(f"{folder}: configuration {name} has no 'architecture' entry (plans from before "
                               "nnU-Net v2.4); rerun nnUNetv2_plan_experiment to update them")
    return config


def _resampling(config: dict, key: str, folder: Path) -> Resampling:
    if config.get(key, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
        raise NnunetModelError(f"{folder}: {key} is {config[key]!r}; panseg implements nnU-Net's "
                               "resample_data_or_seg_to_shape only")
    kwargs = config.get(f"{key}_kwargs", {})
    return Resampling(int(kwargs.get("order", 3 if key == "resampling_fn_data" else 1)), int(kwargs.get("order_z", 0)),
                      kwargs.get("force_separate_z"))


def _labels(dataset: dict, folder: Path) -> dict[str, int]:
    labels = dataset.get("labels", {})
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise NnunetModelError(f"{folder}: dataset.json defines region-based labels (sigmoid outputs); panseg runs "
                               "softmax label models only")
    labels = {k: int(v) for k, v in labels.items() if k != "ignore"}
    if sorted(labels.values()) != list(range(len(labels))):
        raise NnunetModelError(f"{folder}: dataset.json's labels must be 0..K-1, but they are {sorted(labels.values())}")
    return labels


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def build_network(plan: NnunetPlan) -> UNet3D:
    """panseg's UNet3D for the plan's PlainConvUNet (no deep supervision: only the full-resolution head runs).

    Raises:
        NnunetModelError: the plan names a network or layer panseg cannot build, naming it.
    """
    arch = plan.architecture
    name, kw = arch.get("network_class_name", "?"), arch.get("arch_kwargs", {})
    if name != PLAIN_UNET:
        raise NnunetModelError(f"the plans' network is {name}; panseg builds nnU-Net's PlainConvUNet "
                               f"({PLAIN_UNET}) only (ResEnc and other U-Nets are not implemented)")
    expected = {"conv_op": _CONV, "norm_op": _NORM, "nonlin": _NONLIN, "dropout_op": None, "conv_bias": True}
    for key, value in expected.items():
        if kw.get(key) != value:
            raise NnunetModelError(f"the plans' PlainConvUNet has {key}={kw.get(key)!r}; panseg builds {value!r}")
    norm = kw.get("norm_op_kwargs") or {}
    if not norm.get("affine", False) or float(norm.get("eps", 1e-5)) != 1e-5:
        raise NnunetModelError(f"the plans' norm_op_kwargs are {norm}; panseg builds InstanceNorm3d(eps=1e-5, affine)")
    n_enc, n_dec = list(kw["n_conv_per_stage"]), list(kw["n_conv_per_stage_decoder"])
    if len(set(n_enc + n_dec)) != 1:
        raise NnunetModelError(f"the plans' PlainConvUNet has {n_enc} convolutions per encoder stage and {n_dec} per "
                               "decoder stage; panseg builds the same number everywhere")
    slope = float((kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01))
    return UNet3D(in_channels=plan.num_channels, num_classes=plan.num_classes,
                  features_per_stage=kw["features_per_stage"], strides=kw["strides"], n_conv_per_stage=n_enc[0],
                  kernel_size=[tuple(k) for k in kw["kernel_sizes"]], deep_supervision=False, negative_slope=slope)


_RENAMES = (  # PlainConvUNet's state-dict names -> UNet3D's
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$"), r"encoder.\1.\2.\3.\4"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)$"), r"decoder.\1.\2.\3.\4"),
    (re.compile(r"^decoder\.transpconvs\.(\d+)\.(weight|bias)$"), r"upsamplers.\1.\2"),
    (re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$"), r"heads.\1.\2"),
)


def to_panseg_state(network_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PlainConvUNet state dict under UNet3D's names. Its aliases (`.all_modules.` and the decoder's
    `decoder.encoder.` view of the encoder) are dropped; any other unknown name is an error."""
    out = {}
    for key, value in network_weights.items():
        key = key.removeprefix("_orig_mod.").removeprefix("module.")  # compiled or DDP-wrapped when saved
        if ".all_modules." in key or key.startswith("decoder.encoder."):
            continue
        for pattern, target in _RENAMES:
            if pattern.match(key):
                out[pattern.sub(target, key)] = value
                break
        else:
            raise NnunetModelError(f"network weight {key!r} is not one of PlainConvUNet's; is this a ResEnc or "
                                   "another network's checkpoint?")
    return out


def load_nnunet_checkpoint(path: str | Path) -> dict:
    """An nnU-Net checkpoint, loaded with weights_only=True and exactly nnU-Net's numpy types allowed.

    Raises:
        NnunetModelError: the file is unreadable, holds another object, or has no network weights.
    """
    try:
        with torch.serialization.safe_globals(NUMPY_CHECKPOINT_GLOBALS):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or unsafe files
        detail = " ".join(str(err).split())
        found = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
        reason = f"it holds an object of {found.group(1)}, which is not allowed" if found else detail[:300]
        raise NnunetModelError(f"{path} cannot be loaded safely (weights_only=True): {reason}. panseg never "
                               "unpickles arbitrary objects; only tensors, plain values and numpy scalars") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("network_weights"), dict):
        raise NnunetModelError(f"{path} is a torch file but not an nnU-Net checkpoint (no 'network_weights' entry)")
    return payload


@dataclass(frozen=True)
class NnunetModel:
    """A model folder ready to predict: its plan, one network and each fold's weights (UNet3D names)."""

    folder: Path
    plan: NnunetPlan
    network: UNet3D
    fold_weights: tuple[dict, ...]
    checkpoints: tuple[Path, ...]
    mirror_axes: tuple[int, ...]  # the checkpoint's inference_allowed_mirroring_axes (network axes)
    trainer_name: str


def load_nnunet_model(folder: str | Path, folds: Sequence[str | int] | None = None) -> NnunetModel:
    """Read the plans, build the network and load every requested fold (on the CPU).

    Raises:
        NnunetModelError: see `read_plan`, `build_network`, `fold_checkpoints`, `load_nnunet_checkpoint`,
            and weights that do not fit the network the plans describe.
    """
    folder = Path(folder)
    if not is_nnunet_model_folder(folder):
        raise NnunetModelError(f"{folder} is not an nnU-Net v2 model folder (plans.json, dataset.json, fold_K/)")
    files = fold_checkpoints(folder, folds)
    first = load_nnunet_checkpoint(files[0])
    configuration = (first.get("init_args") or {}).get("configuration")
    plan = read_plan(folder, configuration)
    network = build_network(plan)
    weights = []
    for i, file in enumerate(files):
        state = to_panseg_state((first if i == 0 else load_nnunet_checkpoint(file))["network_weights"])
        try:
            network.load_state_dict(state)
        except RuntimeError as err:
            raise NnunetModelError(f"{file}: its weights do not fit the network plans.json describes: "
                                   f"{' '.join(str(err).split())[:300]}") from None
        weights.append(state)
    mirror = first.get("inference_allowed_mirroring_axes")
    return NnunetModel(folder, plan, network.eval().requires_grad_(False), tuple(weights), tuple(files),
                       tuple(int(a) for a in mirror) if mirror is not None else (),
                       str(first.get("trainer_name", "?")))


__all__ = [
    "CHECKPOINT_NAMES", "NUMPY_CHECKPOINT_GLOBALS", "NnunetModel", "NnunetModelError", "NnunetPlan", "Resampling",
    "build_network", "fold_checkpoints", "is_nnunet_model_folder", "load_nnunet_checkpoint", "load_nnunet_model",
    "read_plan", "to_panseg_state",
]

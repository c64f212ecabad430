"""Tiny nnU-Net v2 model folders and phantom CTs for the agreement tests and bench/nnunet_predict.py.

`write_model_folder` writes what nnU-Net's training leaves behind: `plans.json` in nnU-Net v2.8.1's
format (the entries its ExperimentPlanner writes, with tiny numbers), `dataset.json`, and per fold
`fold_K/checkpoint_final.pth` holding the weights of the network nnU-Net itself builds from those plans
(`get_network_from_plans`, seeded random init) and the other entries its trainer saves, numpy scalars
in `logging` included. `write_cases` writes phantom CTs (a body with an organ and a lesion in air,
inside a zero rim outside the field of view, so the nonzero crop matters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from panseg.io import Volume, write_volume

LABELS = {"background": 0, "liver": 1, "tumor": 2}


@dataclass(frozen=True)
class TinyPlan:
    """A 3-stage PlainConvUNet configuration (transposed axes, as plans.json holds them)."""

    name: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    kernel_sizes: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    features: tuple[int, ...] = (4, 8, 16)


FULLRES = TinyPlan("3d_fullres", (2.0, 1.6, 1.6), (16, 32, 32), ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)))
# Coarse along the CT's x axis: nnU-Net's planner moves that axis first (transpose_forward [2, 0, 1]).
ANISOTROPIC = TinyPlan("3d_fullres", (4.0, 1.25, 1.25), (8, 32, 32), ((1, 3, 3), (3, 3, 3), (3, 3, 3)),
                       ((1, 1, 1), (1, 2, 2), (2, 2, 2)), transpose_forward=(2, 0, 1), mirror_axes=(1, 2))


def _configuration(plan: TinyPlan) -> dict:
    n = len(plan.features)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": f"nnUNetPlans_{plan.name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(plan.patch_size), "median_image_size_in_voxels": [40, 40, 40],
        "spacing": list(plan.spacing), "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(plan.features), "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [list(k) for k in plan.kernel_sizes], "strides": [list(s) for s in plan.strides],
                "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }


def plans_json(plan: TinyPlan) -> dict:
    backward = tuple(int(i) for i in np.argsort(plan.transpose_forward))
    return {
        "dataset_name": "Dataset901_Phantom", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(plan.spacing),
        "original_median_shape_after_transp": [40, 40, 40], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(plan.transpose_forward), "transpose_backward": list(backward),
        "configurations": {plan.name: _configuration(plan)},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 400.0, "mean": 60.0, "median": 55.0, "min": -300.0, "percentile_00_5": -150.0,
            "percentile_99_5": 250.0, "std": 70.0}},
    }


def dataset_json(cases: int = 4) -> dict:
    return {"channel_names": {"0": "CT"}, "labels": dict(LABELS), "numTraining": cases, "file_ending": ".nii.gz"}


def _checkpoint(plans: dict, plan: TinyPlan, fold: int, seed: int) -> dict:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"][plan.name]["architecture"]
    torch.manual_seed(seed)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, len(LABELS), allow_init=True, deep_supervision=True)
    logging = {  # what nnU-Net's LocalLogger holds after two epochs: numpy float64 from np.mean / np.nanmean
        "mean_fg_dice": [np.float64(0.1), np.float64(0.2)], "ema_fg_dice": [np.float64(0.1), np.float64(0.11)],
        "dice_per_class_or_region": [[np.float64(0.1), np.float64(0.1)]] * 2,
        "train_losses": [np.float64(1.0), np.float64(0.9)], "val_losses": [np.float64(1.1), np.float64(1.0)],
        "lrs": [0.01, 0.00999], "epoch_start_timestamps": [1.0, 2.0], "epoch_end_timestamps": [1.5, 2.5]}
    return {"network_weights": network.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
            "logging": logging, "_best_ema": np.float64(0.11), "current_epoch": 2,
            "init_args": {"plans": plans, "configuration": plan.name, "fold": fold, "dataset_json": dataset_json(),
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": plan.mirror_axes}


def write_model_folder(root: Path, plan: TinyPlan, folds: tuple[int, ...] = (0, 1), seed: int = 0) -> Path:
    """`root/nnUNetTrainer__nnUNetPlans__<configuration>/` with plans, dataset.json and `fold_K/checkpoint_final.pth`."""
    import json

    import torch

    folder = Path(root) / f"nnUNetTrainer__nnUNetPlans__{plan.name}"
    folder.mkdir(parents=True)
    plans = plans_json(plan)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(), indent=2))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.save(_checkpoint(plans, plan, fold, seed + fold), folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def phantom_ct(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], seed: int) -> Volume:
    """Air, a body ellipsoid (40 HU) with an organ (120 HU) and a lesion (10 HU) in it, noise, and a zero rim."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape_zyx), indexing="ij")
    r2 = sum(g**2 for g in grids)
    ct = np.full(shape_zyx, -1000.0)
    ct[r2 < 0.8] = 40.0
    organ = sum((g - c) ** 2 for g, c in zip(grids, rng.uniform(-0.25, 0.25, 3))) < 0.12
    ct[organ] = 120.0
    lesion = sum((g - c) ** 2 for g, c in zip(grids, rng.uniform(-0.3, 0.3, 3))) < 0.03
    ct[lesion] = 10.0
    ct += rng.normal(0, 15, shape_zyx)
    ct[:2], ct[:, :, -3:] = 0, 0  # outside the field of view: nnU-Net crops to the nonzero box
    return Volume(ct.astype(np.int16), spacing_zyx, (10.0, -5.0, 3.0))


def write_cases(folder: Path, shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
                cases: int = 2, seed: int = 0) -> Path:
    """`folder/case_K_0000.nii.gz` phantoms (shapes vary by a few voxels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(cases):
        shape = tuple(n + 3 * k for n in shape_zyx)
        write_volume(phantom_ct(shape, spacing_zyx, seed + k), folder / f"case_{k}_0000.nii.gz")
    return folder

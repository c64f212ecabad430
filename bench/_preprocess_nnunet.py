"""nnU-Net v2's own preprocessing of a bench case, for `bench/preprocess.py` to compare against.

nnU-Net is not a dependency of panseg, and a plain `pip install nnunetv2` replaces the CPU torch with
a multi-GB CUDA build (nnunetv2 -> timm -> torchvision -> the newest torch). Install it so that torch
stays as it is, checking each step with --dry-run first:

    pip install --no-deps nnunetv2 batchgenerators acvl-utils dynamic-network-architectures
    pip install tqdm blosc2 scikit-image nibabel   # what DefaultPreprocessor imports; none of them needs torch

The plans are built in code: what `nnUNetv2_plan_experiment` writes for a CT 3d_fullres configuration
at the paper's target spacing, with the parts preprocessing reads (CTNormalization with the paper's
HU window as the 0.5 / 99.5 percentiles, order-3 data / order-1 seg resampling to a shape, separate z
decided as nnU-Net decides it: here 2.5 / 0.8 > 3, so in-plane order 3 then nearest along z).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TARGET_SPACING_ZYX_MM = [1.6, 1.2859, 1.2859]  # the paper's, as in PreprocessConfig
CT_INTENSITY = {"mean": 40.0, "std": 100.0, "median": 40.0, "min": -1024.0, "max": 3071.0,
                "percentile_00_5": -160.0, "percentile_99_5": 240.0}
LABELS = {"background": 0, **{f"organ_{i}": i for i in range(1, 14)}, "tumor": 14}


def plans_dict() -> dict:
    """A nnU-Net v2 plans dict with one CT '3d_fullres' configuration (the keys preprocessing reads,
    and the architecture block so that ConfigurationManager takes it as a current-format plan)."""
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
                        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                        "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    fullres = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [96, 128, 160], "median_image_size_in_voxels": [469, 319, 319],
        "spacing": TARGET_SPACING_ZYX_MM, "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": architecture, "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset999_PansegBench", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, 0.8, 0.8],
        "original_median_shape_after_transp": [300, 512, 512],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": fullres},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_INTENSITY},
    }


def dataset_json() -> dict:
    return {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 1, "file_ending": ".nii.gz"}


def write_fused_seg(files: dict, out: Path) -> str:
    """nnU-Net reads one label file: organs 1-13 with the tumor as 14 on top (what panseg fuses itself)."""
    from panseg.io import read_volume, write_volume
    from panseg.preprocessing.case import fuse_labels

    tumor, organs = read_volume(files["label"]), read_volume(files["organs"])
    write_volume(tumor.with_array(fuse_labels(tumor.array, organs.array, "tumor")), out)
    return str(out)


# A fresh process, pinned to one CPU like panseg's child: nnU-Net's run_case (read image and seg,
# crop to nonzero, CT normalisation, order-3 separate-z resampling, seg resampling, class locations).
CHILD = r"""
import json, os, resource, sys, time, warnings
os.sched_setaffinity(0, {int(sys.argv[3])})
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[4])
from _preprocess_nnunet import dataset_json, plans_dict
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
import torch
torch.set_num_threads(1)
plans = PlansManager(plans_dict())
config = plans.get_configuration("3d_fullres")
config.resampling_fn_data, config.resampling_fn_seg  # resolve the functions before the clock starts
BASE_RSS_MB = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmRSS"].split()[0]) / 1024
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
data, seg, props = DefaultPreprocessor(verbose=False).run_case([sys.argv[1]], sys.argv[2], plans, config,
                                                               dataset_json())
r1 = resource.getrusage(resource.RUSAGE_SELF)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"wall_s": time.perf_counter() - t0, "user_s": r1.ru_utime - r0.ru_utime,
                  "sys_s": r1.ru_stime - r0.ru_stime, "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024,
                  "base_rss_mb": BASE_RSS_MB, "page_faults": r1.ru_minflt - r0.ru_minflt,
                  "shape": list(data.shape[1:]), "nonzero_crop_bbox": [list(map(int, b)) for b in
                                                                        props["bbox_used_for_cropping"]],
                  "nnunetv2_version": __import__("importlib.metadata").metadata.version("nnunetv2")}))
"""


def available() -> str | None:
    """None when nnU-Net v2's preprocessing imports, else why not."""
    try:
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor  # noqa: F401
    except ImportError as err:
        return f"nnunetv2 preprocessing does not import ({err}); see bench/_preprocess_nnunet.py for the install"
    return None


__all__ = ["CHILD", "available", "dataset_json", "plans_dict", "write_fused_seg"]

"""The MONAI peer recipe of bench/learning.py (bench extra): trained on panseg's store and split.

MONAI's DynUNet (features 8-16-32-64, kernels 3, strides 1-2-2-2, instance norm, 351k parameters,
no deep supervision), `DiceCELoss(to_onehot_y, softmax)`, `RandCropByLabelClassesd` (patch 32x64x64,
tumor drawn 5x as often as each organ, never background, as panseg's sampler with
`random_patch_fraction` 0), batch 2 (two random training cases a step), AdamW lr 1e-2 with poly decay
(exponent 0.9) over the elapsed share of the time budget, the image clipped to [-160, 240] HU and
scaled to [0, 1] as panseg does. The training cases are read from the store once, into memory.

Snapshots: WORK/runs/monai/snapshots/minute_M/{model.pt, snapshot.json}; `monai_predictor` wraps one in
panseg's Predictor (panseg's crop, resampling, Gaussian sliding window and restore), so both recipes
are scored by the same code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from panseg.config import TUMOR_ID
from panseg.demo import demo_config
from panseg.inference.predictor import NetworkLogits, Predictor
from panseg.store.zarr_store import read_case

FEATURES = (8, 16, 32, 64)
PATCH_ZYX = (32, 64, 64)
NUM_CLASSES = TUMOR_ID + 1


def make_dynunet() -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, kernel_size=[3] * len(FEATURES),
                   strides=[1] + [2] * (len(FEATURES) - 1), upsample_kernel_size=[2] * (len(FEATURES) - 1),
                   filters=list(FEATURES), norm_name="instance", deep_supervision=False, res_block=False)


def _scaled(image_hu: np.ndarray, clip_hu: tuple[float, float]) -> np.ndarray:
    low, high = clip_hu
    return ((np.clip(image_hu.astype(np.float32), low, high) - low) / (high - low))[None]


def train_monai(work: Path, store: Path, split: dict, minutes: float, snapshots: tuple[float, ...],
                seed: int = 0) -> Path:
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByLabelClassesd

    run = work / "runs" / "monai"
    if run.exists():
        shutil.rmtree(run)
    (run / "snapshots").mkdir(parents=True)
    clip = demo_config().preprocess.clip_hu
    cases = []
    for case_id in split["train"]:
        image_hu, label, _ = read_case(str(store), case_id)
        cases.append({"image": _scaled(image_hu, clip), "label": label[None].astype(np.int64)})
    crop = RandCropByLabelClassesd(keys=("image", "label"), label_key="label", spatial_size=PATCH_ZYX,
                                   ratios=[0] + [1] * (TUMOR_ID - 1) + [5], num_classes=NUM_CLASSES, num_samples=1,
                                   allow_smaller=True, warn=False)
    crop.set_random_state(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = make_dynunet()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    base_lr = 1e-2
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=1e-5)
    pending = sorted(snapshots)
    budget = 60.0 * minutes
    started, steps, losses = time.monotonic(), 0, []
    while True:
        elapsed = time.monotonic() - started
        while pending and elapsed >= 60.0 * pending[0]:
            _save_snapshot(run, model, pending.pop(0), steps, elapsed)
        if elapsed >= budget:
            break
        for group in optimizer.param_groups:
            group["lr"] = base_lr * (1 - elapsed / budget) ** 0.9
        batch = [crop(cases[i])[0] for i in rng.integers(0, len(cases), size=2)]
        # A case smaller than the patch on some axis gives a smaller crop: pad each before stacking.
        image = torch.stack([_pad_to(torch.as_tensor(np.asarray(b["image"]), dtype=torch.float32), PATCH_ZYX)
                             for b in batch])
        label = torch.stack([_pad_to(torch.as_tensor(np.asarray(b["label"]), dtype=torch.long), PATCH_ZYX)
                             for b in batch])
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        steps += 1
        losses.append(float(loss.detach()))
        if steps % 200 == 0:
            print(f"monai: step {steps}, {elapsed / 60:.1f} min, loss {np.mean(losses[-200:]):.4f}", flush=True)
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": float(np.mean(losses[-200:])),
                                                    "steps": steps}) + "\n")
    return run


def _pad_to(tensor: torch.Tensor, size_zyx: tuple[int, int, int]) -> torch.Tensor:
    """A case smaller than the patch is padded at its far faces (image air, label background)."""
    pads = []
    for have, want in zip(reversed(tensor.shape[-3:]), reversed(size_zyx)):
        pads += [0, max(0, want - have)]
    return torch.nn.functional.pad(tensor, pads) if any(pads) else tensor


def _save_snapshot(run: Path, model: torch.nn.Module, minute: float, steps: int, elapsed: float) -> None:
    folder = run / "snapshots" / f"minute_{minute:g}"
    tmp = folder.with_name(f".tmp-{folder.name}")
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    (tmp / "snapshot.json").write_text(json.dumps({"minutes": minute, "steps": steps, "elapsed_seconds": elapsed}))
    os.replace(tmp, folder)


def monai_predictor(folder: Path, threads: int) -> Predictor:
    """A snapshot's DynUNet inside panseg's Predictor (the demo's preprocessing and inference settings)."""
    cfg = demo_config()
    model = make_dynunet()
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    model.requires_grad_(False)
    model.eval()
    device = torch.device("cpu")
    return Predictor(cfg, NetworkLogits(model, PATCH_ZYX, NUM_CLASSES, cfg.infer, device), device, threads)

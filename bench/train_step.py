"""Training-step and data-loading throughput on CPU.

    python bench/train_step.py --out bench/results/train_step.json
    python bench/train_step.py --patch 48 64 64 --steps 5 --sampler-cases 2 --sampler-patches 40
    python bench/train_step.py --only sampler --out bench/results/sampler.json
    taskset -c 1 python bench/train_step.py --only layout --out bench/results/train_layout.json

Three measurements, each against its reference in the same run:
1. Iterations per second of the full paper model (features 32-320, 15 classes, deep supervision,
   the paper's loss) at a reduced patch, for panseg's UNet3D and for nnU-Net's PlainConvUNet
   (dynamic-network-architectures) built with the same plan, same batch, same optimiser; the two
   alternate step by step so machine noise hits both alike. Target: panseg / nnU-Net time <= 1.05.
2. The sampler's patches per second per CPU core at the paper's 96x128x160 patch from a store of
   realistic phantom cases preprocessed with the paper preset (one thread, image + label, scaled).
   Target: >= 30 patches/s/core, so a GPU step (~0.3 s for batch 2) never waits on data. The
   sampler reads the store's shards directly (`panseg.store.shard_reader`); the same sampler reading
   through zarr-python alone is the reference, batch by batch alternating, and the two must give
   identical batches.
3. The training step of the demo's network (tiny preset: features 8-64, 15 classes, deep
   supervision, patch 32x64x64, batch 2, AdamW) on one thread, channels-last 3D
   (`train.memory_format`'s CPU default) against contiguous, same weights and batch, alternating
   step by step; the loss of both layouts is checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _nnunet_model(cfg, strides, num_classes):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(
        input_channels=1, n_stages=len(strides), features_per_stage=list(cfg.model.features_per_stage),
        conv_op=torch.nn.Conv3d, kernel_sizes=[[3, 3, 3]] * len(strides), strides=[list(s) for s in strides],
        n_conv_per_stage=[2] * len(strides), num_classes=num_classes, n_conv_per_stage_decoder=[2] * (len(strides) - 1),
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"negative_slope": 1e-2, "inplace": True}, deep_supervision=True)


def paired_models(cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
    """panseg's UNet3D for `cfg` (seed 0) and nnU-Net's PlainConvUNet with the same plan and weights."""
    from panseg.training.parts import make_model

    torch.manual_seed(0)
    ours = make_model(cfg)
    theirs = _nnunet_model(cfg, ours.strides, ours.num_classes)
    with torch.no_grad():  # same weights: the parameters map one to one, in order
        for mine, ref in zip(ours.parameters(), theirs.parameters(), strict=True):
            ref.copy_(mine)
    return ours, theirs


def bench_steps(patch: tuple[int, int, int], steps: int, batch: int) -> dict:
    from panseg.config import preset
    from panseg.training.parts import make_loss, make_optimizer

    cfg = preset("paper")
    ours, theirs = paired_models(cfg)
    loss = make_loss(cfg, len(ours.strides) - 1)
    image = torch.rand(batch, 1, *patch)
    label = torch.randint(0, 15, (batch, 1, *patch))
    models = {"panseg": ours, "nnunet": theirs}
    optimizers = {k: make_optimizer(m, cfg.train) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps + 1):  # step 0 warms up both
        for name, model in models.items():
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            value = loss(model(image), label)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            optimizers[name].step()
            if step:
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"patch_zyx": list(patch), "batch": batch, "steps": steps, "threads": torch.get_num_threads(),
            "seconds_per_step": median, "iterations_per_second": {k: 1 / v for k, v in median.items()},
            "ratio_panseg_over_nnunet": median["panseg"] / median["nnunet"]}


def bench_layout(steps: int) -> dict:
    from panseg.config import build_config
    from panseg.training.parts import build_training_parts

    cpu = torch.device("cpu")
    parts = {}
    for layout in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        parts[layout] = build_training_parts(build_config("tiny", overrides=[f"train.memory_format={layout}"]), cpu)
    patch = tuple(build_config("tiny").train.patch_size_zyx)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, *patch, generator=generator)
    label = torch.randint(0, 15, (2, 1, *patch), generator=generator)
    times: dict[str, list[float]] = {k: [] for k in parts}
    losses: dict[str, list[float]] = {k: [] for k in parts}
    for step in range(steps + 1):  # step 0 warms up both
        for name, p in parts.items():
            start = time.perf_counter()
            p.optimizer.zero_grad(set_to_none=True)
            loss = p.loss(p.model(image), label)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), 12.0)
            p.optimizer.step()
            elapsed = time.perf_counter() - start
            losses[name].append(float(loss.detach()))
            if step:
                times[name].append(elapsed)
    # same weights, same batch: the first loss (before any update) agrees to float rounding; later ones
    # drift apart only by the rounding that different summation orders leave, amplified by AdamW
    first_cl, first_c = losses["channels_last"][0], losses["contiguous"][0]
    assert abs(first_cl - first_c) <= 1e-5 * abs(first_c), f"the layouts compute different losses: {first_cl} vs {first_c}"
    drift = max(abs(a - b) / abs(b) for a, b in zip(losses["channels_last"], losses["contiguous"]))
    assert drift < 1e-2, f"the layouts train apart: relative loss difference {drift}"
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"patch_zyx": list(patch), "batch": 2, "steps": steps,
            "seconds_per_step": {k: round(v, 4) for k, v in median.items()},
            "all_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "speedup_channels_last": round(median["contiguous"] / median["channels_last"], 3),
            "loss_relative_difference_max": float(f"{drift:.2e}")}


def build_store(workdir: Path, cases: int) -> Path:
    from panseg.config import preset
    from panseg.data_pipeline import process_one
    from panseg.io import discover_cohort
    from panseg.phantom.cohort import write_cohort
    from panseg.store.zarr_store import create_store, write_manifest

    raw, store = workdir / "raw", workdir / "store.zarr"
    write_cohort(raw, cases=cases, healthy=0, seed=0, small=False)
    cfg = preset("paper").preprocess
    create_store(store, cfg)
    rows = [process_one(c, str(store), cfg, threads=2) for c in discover_cohort(raw).valid]
    write_manifest(store, rows)
    return store


def bench_sampler(store: Path, patches: int) -> dict:
    from numcodecs import blosc

    from panseg.config import preset
    from panseg.store.zarr_store import open_case, read_manifest
    from panseg.training.sampling import PatchSampler

    class ZarrOnlySampler(PatchSampler):  # the reference: every patch read through zarr-python
        def _open_case(self, case_id):
            return open_case(self.store_path, case_id, direct_reads=False)

    blosc.set_nthreads(1)  # one thread, as in a loader thread (numcodecs uses Blosc threads only on the main one)
    cfg = preset("paper")
    ids = [r["case_id"] for r in read_manifest(store) if r["status"] == "ok"]
    args = (str(store), ids, cfg.train.patch_size_zyx, cfg.train.tumor_sampling_ratio, 0.0, cfg.preprocess.clip_hu)
    samplers = {"direct": PatchSampler(*args), "zarr": ZarrOnlySampler(*args)}
    wall = dict.fromkeys(samplers, 0.0)
    cpu = dict.fromkeys(samplers, 0.0)
    for sampler in samplers.values():
        sampler.batch(0, 0, 2)  # open the cases once, as a long training run has
    for i in range(patches // 2):  # the two alternate batch by batch, so machine noise hits both alike
        batches = {}
        for name, sampler in samplers.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            batches[name] = sampler.batch(1, i, 2)
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
        for ours, reference in zip(batches["direct"], batches["zarr"]):
            if not np.array_equal(ours, reference):
                raise AssertionError(f"batch {i}: the direct shard reads differ from zarr's")
    n = patches // 2 * 2
    return {"patch_zyx": list(cfg.train.patch_size_zyx), "patches": n, "cases": len(ids), "identical_batches": True,
            "patches_per_second_wall": {k: n / v for k, v in wall.items()},
            "patches_per_cpu_second": {k: n / v for k, v in cpu.items()},
            "speedup_cpu": cpu["zarr"] / cpu["direct"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 64, 64], help="reduced training patch (z y x)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sampler-cases", type=int, default=3)
    parser.add_argument("--sampler-patches", type=int, default=60)
    parser.add_argument("--only", choices=("train_step", "sampler", "layout"), default=None, help="run one measurement")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core, so the figures are per core
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "torch": torch.__version__, "load_average_1min": os.getloadavg()[0]}
    if args.only in (None, "train_step"):
        result["train_step"] = bench_steps(tuple(args.patch), args.steps, args.batch)
        print(json.dumps(result["train_step"], indent=2), flush=True)
    if args.only in (None, "sampler"):
        with tempfile.TemporaryDirectory(prefix="panseg-bench-") as tmp:
            store = build_store(Path(tmp), args.sampler_cases)
            result["load_average_1min_sampler"] = os.getloadavg()[0]
            result["sampler"] = bench_sampler(store, args.sampler_patches)
        print(json.dumps(result["sampler"], indent=2))
    if args.only in (None, "layout"):
        result["load_average_1min_layout"] = os.getloadavg()[0]
        result["layout"] = bench_layout(args.steps)
        print(json.dumps({k: v for k, v in result["layout"].items() if k != "all_seconds"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU measurements in one run: training iterations/s (bf16), inference seconds per case, FLARE memory-time area.

    python bench/gpu.py --out OUT                       # on a CUDA machine (~5 min on an H200)
    python bench/gpu.py --quick --out /tmp/gpu-quick    # the same code paths at toy sizes on the CPU (a rehearsal)

It needs no Ray: the store is written with `data_pipeline.process_one` in a process pool (what Ray
Data's actors run per case), and training runs in `--local` mode (`train_local`). Each phase writes
its results into OUT/gpu.json as soon as it ends; a phase that fails records its error there and the
next phases go on. Phases:

1. cohort   realistic phantoms (`panseg.phantom.cohort`, full size), preprocessed with the paper preset.
2. train    the real training loop (`train_local`): paper preset (30.8M parameters, patch 96x128x160,
            batch 2, bf16 autocast, AdamW, augmentations on the GPU, patches read from the store by
            loader threads), E epochs of I iterations, then validation by sliding window on the
            held-out cases. Iterations/s per epoch from the run's own metrics; the first epoch holds
            the warm-up (cuDNN's algorithm search, allocator growth).
3. step     the training step alone (`train_loop._step`: forward, loss, backward, clipping, AdamW) on
            one batch held in GPU memory, for panseg's UNet3D (contiguous, as trained on GPU, and
            channels-last) and nnU-Net's PlainConvUNet with the same plan and weights, alternating step
            by step, with `torch.backends.cudnn.benchmark` off and on.
4. predict  the run's model loaded with `load_predictor`; `predict_case` on every held-out CT (read,
            crop, resample, network, argmax, restore, write): wall seconds, seconds per phase, peak
            GPU memory and the FLARE GPU memory-time area (NVML's used memory every 0.1 s, as the
            organisers sample it). The first case is predicted once before, as a warm-up.
5. monai    on the largest held-out case, cropped and resampled: panseg's sliding window (bf16 autocast,
            accumulation in place on the GPU) against MONAI's `sliding_window_inference` with the same
            weights, window, overlap 1/8, Gaussian sigma 1/8 and 2 windows per pass, both in MONAI's
            default fp32 and inside a bf16 autocast; alternating, 1 warm-up + `--repeats`; peak GPU
            memory allocated above what was held before; the logits compared.
6. crop     `predict_volume` of bench/infer.py's synthetic 300-slice 512x512 CT (a table under the
            body) with the paper's largest-component crop and without (preprocess.crop_method=none).
7. sw       on that CT, cropped (random weights): panseg's and MONAI's sliding windows in fp32 (TF32
            convolutions, torch's default), bf16 and fp16, 1, 2 and 4 windows per pass; panseg with
            channels-last weights.
8. compile  the same with the network through `torch.compile(model, dynamic=False)`, against eager.
9. predictor  `load_predictor` eager against `infer.compile=true` (also 4 windows per pass): the
            sliding window against MONAI, and `predict_case` of three synthetic CTs (the compiled
            predictor's first case holds the compilation).
Phases 7-9 need no cohort: `--only sw compile predictor`.

Figures go to BENCHMARKS.md ("GPU"), with the card's name from OUT/gpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
PHASES = ("train", "step", "predict", "monai", "crop", "sw", "compile", "predictor")


def _bench_module(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str
    cases: int
    healthy: int
    small: bool
    epochs: int
    iterations: int
    step_repeats: int
    repeats: int
    crop_z_slices: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls("tiny", cases=5, healthy=1, small=True, epochs=2, iterations=3, step_repeats=2, repeats=1,
                       crop_z_slices=12)
        return cls("paper", cases=10, healthy=2, small=False, epochs=3, iterations=40, step_repeats=12, repeats=3,
                   crop_z_slices=300)


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------


def phase_cohort(work: Path, sizes: Sizes, workers: int) -> dict:
    from panseg.config import build_config
    from panseg.phantom.cohort import write_cohort

    raw, store = work / "raw", work / "store.zarr"
    start = time.perf_counter()
    write_cohort(raw, cases=sizes.cases, healthy=sizes.healthy, seed=0, small=sizes.small, workers=workers)
    generated = time.perf_counter() - start
    # A spawn pool: the parent holds a CUDA context, which a fork must not copy.
    rows = _bench_module("_preprocess_cohort").store_cohort(raw, store, build_config(sizes.preset).preprocess, workers)
    return {"cases": len(rows), "generate_s": round(generated, 1), "total_s": round(time.perf_counter() - start, 1),
            "preprocess_s_mean": round(statistics.mean(r["seconds"] for r in rows), 2),
            "shapes_zyx": {r["case_id"]: {"original": r["original_shape"], "resampled": r["resampled_shape"]}
                           for r in rows}}


def phase_train(work: Path, sizes: Sizes) -> dict:
    from panseg.config import build_config
    from panseg.train_loop import make_job, read_metrics, train_local

    cfg = build_config(sizes.preset, overrides=[
        f"train.epochs={sizes.epochs}", f"train.iterations_per_epoch={sizes.iterations}",
        f"train.val_every_epochs={sizes.epochs}", f"train.checkpoint_every_epochs={sizes.epochs}",
        "train.val_max_cases=3", "train.loader_threads=4"])
    job = make_job(cfg, str(work / "store.zarr"), str(work / "run"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, wall = _timed(lambda: train_local(job), device)
    metrics = read_metrics(work / "run")
    epoch_s = [m["epoch_seconds"] for m in metrics]
    return {"preset": sizes.preset, "patch_zyx": list(cfg.train.patch_size_zyx), "batch": cfg.train.batch_size,
            "precision": cfg.train.precision if device.type == "cuda" else "fp32",
            "epochs": sizes.epochs, "iterations_per_epoch": sizes.iterations,
            "epoch_seconds": [round(s, 2) for s in epoch_s],
            "iterations_per_second": [round(sizes.iterations / s, 3) for s in epoch_s],
            "iterations_per_second_after_warmup": round(sizes.iterations * (len(epoch_s) - 1) / sum(epoch_s[1:]), 3)
            if len(epoch_s) > 1 else None,
            "train_loss": [round(m["train_loss"], 4) for m in metrics],
            "validation_and_checkpoint_s": round(wall - sum(epoch_s), 2), "wall_s": round(wall, 2),
            "val_cases": len(job.val_ids), "val_ids": list(job.val_ids),
            "gpu_max_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda"
            else None}


def phase_step(sizes: Sizes, device: torch.device) -> dict:
    from panseg.config import build_config
    from panseg.train_loop import _step
    from panseg.training.parts import make_loss, make_model, make_optimizer, to_memory_format

    cfg = build_config(sizes.preset)
    tcfg = cfg.train
    ours, theirs = _bench_module("train_step").paired_models(cfg)
    ours_cl = make_model(cfg)
    ours_cl.load_state_dict(ours.state_dict())
    models = {"panseg": ours.to(device), "panseg_channels_last": to_memory_format(ours_cl.to(device),
                                                                                  torch.channels_last_3d),
              "nnunet": theirs.to(device)}
    parts = {k: SimpleNamespace(loss=make_loss(cfg, len(ours.strides) - 1).to(device),
                                optimizer=make_optimizer(m, tcfg)) for k, m in models.items()}
    session = SimpleNamespace(device=device)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(tcfg.batch_size, 1, *tcfg.patch_size_zyx, generator=generator).to(device)
    label = torch.randint(0, ours.num_classes, (tcfg.batch_size, 1, *tcfg.patch_size_zyx),
                          generator=generator).to(device)
    out: dict = {"patch_zyx": list(tcfg.patch_size_zyx), "batch": tcfg.batch_size,
                 "precision": tcfg.precision if device.type == "cuda" else "fp32", "steps": sizes.step_repeats}
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        times: dict[str, list[float]] = {k: [] for k in models}
        for step in range(sizes.step_repeats + 3):  # 3 warm-ups (cuDNN's search runs in the first)
            for name, model in models.items():
                model.train()
                _, seconds = _timed(lambda: _step(model, parts[name], image, label, tcfg, session), device)
                if step >= 3:
                    times[name].append(seconds)
        median = {k: statistics.median(v) for k, v in times.items()}
        out[f"cudnn_benchmark_{benchmark}"] = {
            "seconds_per_step": {k: round(v, 4) for k, v in median.items()},
            "iterations_per_second": {k: round(1 / v, 2) for k, v in median.items()},
            "ratio_panseg_over_nnunet": round(median["panseg"] / median["nnunet"], 3)}
    torch.backends.cudnn.benchmark = False
    return out


def phase_predict(work: Path, device: torch.device, val_ids: list[str]) -> dict:
    from panseg.inference.predictor import load_predictor, predict_case

    predictor = load_predictor(work / "run", device=device, threads=4)
    images = {cid: work / "raw" / "imagesTr" / f"{cid}_0000.nii.gz" for cid in val_ids}
    preds = work / "pred"
    preds.mkdir(exist_ok=True)
    first = next(iter(images))
    warmup = predict_case(predictor, images[first], preds / f"warmup_{first}.nii.gz", case_id=first)
    rows = [predict_case(predictor, path, preds / f"{cid}.nii.gz", case_id=cid) for cid, path in images.items()]
    keys = ("seconds", "gpu_peak_mb", "gpu_area_mb_s", "peak_rss_mb")
    summary = {k: round(statistics.mean(r[k] for r in rows), 2) if rows[0][k] is not None else None for k in keys}
    return {"warmup": warmup, "cases": rows, "mean": summary, "gpu_memory_source": rows[0]["gpu_memory_source"],
            "precision": predictor.cfg.infer.precision, "step_fraction": predictor.cfg.infer.step_fraction,
            "mirror_tta": predictor.cfg.infer.mirror_tta}


def phase_monai(work: Path, device: torch.device, val_ids: list[str], repeats: int) -> dict:
    from panseg.inference.predictor import load_predictor
    from panseg.io import read_volume

    predictor = load_predictor(work / "run", device=device, threads=4)
    cfg, icfg = predictor.cfg, predictor.cfg.infer
    sizes = {cid: (work / "raw" / "imagesTr" / f"{cid}_0000.nii.gz") for cid in val_ids}
    largest = max(sizes, key=lambda c: sizes[c].stat().st_size)
    prepared = predictor.prepare(read_volume(sizes[largest]))
    image = _unit_image(prepared.image_hu, cfg.preprocess.clip_hu, device)
    model, bf16 = predictor.logits_fn.model, predictor.logits_fn.autocast_dtype
    ours = "panseg_bf16" if bf16 else "panseg_fp32"
    variants = {ours: lambda: predictor.logits_fn(image),
                "monai_fp32": _monai(model, image, cfg, icfg.windows_per_batch, None)}
    if bf16:
        variants["monai_bf16_autocast"] = _monai(model, image, cfg, icfg.windows_per_batch, bf16)
    times, peaks, logits = _time_variants(variants, device, repeats, keep_results=True)
    agreement = {}
    for name in logits:
        if name == ours:
            continue
        diff = torch.linalg.vector_norm(logits[ours] - logits[name]) / torch.linalg.vector_norm(logits[name])
        same = (logits[ours].argmax(0) == logits[name].argmax(0)).float().mean()
        agreement[name] = {"relative_l2": float(f"{float(diff):.3e}"), "argmax_agreement": round(float(same), 5)}
    median = _medians(times)
    return {"case_id": largest, "resampled_shape_zyx": list(prepared.resampled.shape_zyx),
            "windows": _bench_module("infer").windows_of(prepared.resampled.shape_zyx, cfg.train.patch_size_zyx,
                                                         icfg.step_fraction),
            "seconds": median, "all_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "time_ratio_panseg_over": {k: round(median[ours] / v, 3) for k, v in median.items() if k != ours},
            "peak_allocated_mb": peaks or None, "logits_vs_panseg": agreement}


def phase_crop(work: Path, device: torch.device, z_slices: int, repeats: int) -> dict:
    from panseg.inference.predictor import load_predictor

    predictor = load_predictor(work / "run", device=device, threads=4)
    cfg = predictor.cfg
    nocrop = predictor.with_config(dataclasses.replace(
        cfg, preprocess=dataclasses.replace(cfg.preprocess, crop_method="none")))
    ct = _bench_module("infer").make_ct(z_slices)
    variants = {"crop": predictor, "nocrop": nocrop}
    times: dict[str, list[float]] = {k: [] for k in variants}
    phases: dict[str, dict] = {}
    shapes: dict[str, list[int]] = {}
    for repeat in range(repeats + 1):
        for name, chosen in variants.items():
            prediction, seconds = _timed(lambda: chosen.predict_volume(ct), device)
            if repeat:
                times[name].append(seconds)
            phases[name] = {k: round(v, 3) for k, v in prediction.seconds.items()}
            shapes[name] = list(prediction.resampled_shape_zyx)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"ct_shape_zyx": list(ct.array.shape), "resampled_shape_zyx": shapes,
            "seconds": {k: round(v, 3) for k, v in median.items()},
            "all_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
            "last_phase_seconds": phases, "ratio_crop_over_nocrop": round(median["crop"] / median["nocrop"], 3)}


def _sw_setup(device: torch.device, sizes: Sizes):
    """The preset's network with seeded random weights (timing does not depend on them) in eval mode, and
    bench/infer.py's synthetic CT, cropped, resampled and scaled, on the device."""
    from panseg.config import build_config
    from panseg.inference.predictor import prepare_volume
    from panseg.training.parts import make_model, num_classes_of

    cfg = build_config(sizes.preset)
    torch.manual_seed(0)
    model = make_model(cfg)
    model.deep_supervision = False
    model.requires_grad_(False)
    model.to(device).eval()
    prepared = prepare_volume(_bench_module("infer").make_ct(sizes.crop_z_slices), cfg.preprocess, threads=4)
    image = _unit_image(prepared.image_hu, cfg.preprocess.clip_hu, device)
    return cfg, model, num_classes_of(cfg), image, list(prepared.resampled.shape_zyx)


def _unit_image(image_hu: np.ndarray, clip_hu: tuple[float, float], device: torch.device) -> torch.Tensor:
    """A prepared case as the network sees it: (1, 1, D, H, W) float32 in [0, 1] on the device."""
    low, high = clip_hu
    image = torch.from_numpy(image_hu.astype(np.float32)).to(device)
    return image.sub_(low).mul_(1.0 / (high - low)).clamp_(0.0, 1.0)[None, None]


def _monai(model: torch.nn.Module, image: torch.Tensor, cfg, per_pass: int, dtype: torch.dtype | None):
    """MONAI's `sliding_window_inference` with panseg's window, overlap and Gaussian; in an autocast to
    `dtype` unless it is None (fp32, MONAI's default)."""
    from monai.inferers import sliding_window_inference

    icfg = cfg.infer

    def run():
        with torch.inference_mode(), torch.autocast(image.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            return sliding_window_inference(image, roi_size=cfg.train.patch_size_zyx, sw_batch_size=per_pass,
                                            predictor=model, overlap=1.0 - icfg.step_fraction, mode="gaussian",
                                            sigma_scale=icfg.gaussian_sigma_scale, padding_mode="constant")[0]
    return run


def _time_variants(variants: dict, device: torch.device, repeats: int, keep_results: bool = False):
    """Run each variant in turn, 1 warm-up round (cuDNN's search, compilation) then `repeats` rounds.

    Returns:
        (seconds of the timed rounds per variant, peak GPU memory allocated above what was held before
        in MB (empty on CPU), the last result of each variant as float32 when keep_results else {}).
    """
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, int] = {}
    results: dict[str, torch.Tensor] = {}
    for repeat in range(repeats + 1):
        for name, fn in variants.items():
            results.pop(name, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                held = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            result, seconds = _timed(fn, device)
            if device.type == "cuda":
                peaks[name] = round((torch.cuda.max_memory_allocated(device) - held) / 2**20)
            if repeat:
                times[name].append(seconds)
            if keep_results:
                results[name] = result.float()
            del result
    return times, peaks, results


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def phase_sw(device: torch.device, sizes: Sizes) -> dict:
    """Sliding-window variants of panseg and MONAI on one volume: precision, windows per pass, layout."""
    from panseg.inference.sliding_window import sliding_window_logits

    torch.backends.cudnn.benchmark = True  # as load_predictor sets it
    cfg, model, classes, image, shape = _sw_setup(device, sizes)
    icfg, window, repeats = cfg.infer, cfg.train.patch_size_zyx, sizes.repeats
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16} if device.type == "cuda" else {"fp32": None}

    def ours(dtype, per_pass):
        return lambda: sliding_window_logits(model, image, window, classes, icfg.step_fraction,
                                             icfg.gaussian_sigma_scale, per_pass, autocast_dtype=dtype)

    variants = {f"panseg_{d}_x{n}": ours(t, n) for d, t in dtypes.items() for n in (1, 2, 4)}
    variants.update({f"monai_{d}_x{n}": _monai(model, image, cfg, n, t) for d, t in dtypes.items() for n in (1, 2, 4)})
    times, peaks, _ = _time_variants(variants, device, repeats)
    # channels-last weights, timed after the others (the conversion is in place)
    model.to(memory_format=torch.channels_last_3d)
    cl_times, cl_peaks, _ = _time_variants({f"panseg_{d}_x2_channels_last": ours(t, 2) for d, t in dtypes.items()},
                                           device, repeats)
    return {"resampled_shape_zyx": shape, "seconds": _medians({**times, **cl_times}),
            "peak_allocated_mb": {**peaks, **cl_peaks}, "tf32_convolutions": torch.backends.cudnn.allow_tf32}


def phase_compile(device: torch.device, sizes: Sizes) -> dict:
    """panseg's sliding window with the network through torch.compile (Inductor), against eager."""
    from panseg.inference.sliding_window import sliding_window_logits

    torch.backends.cudnn.benchmark = True
    cfg, model, classes, image, shape = _sw_setup(device, sizes)
    icfg, window = cfg.infer, cfg.train.patch_size_zyx
    dtypes = {"fp32": None, "bf16": torch.bfloat16} if device.type == "cuda" else {"fp32": None}
    start = time.perf_counter()
    compiled = torch.compile(model, dynamic=False)

    def run(net, dtype):
        return lambda: sliding_window_logits(net, image, window, classes, icfg.step_fraction,
                                             icfg.gaussian_sigma_scale, 2, autocast_dtype=dtype)

    variants = {f"{name}_{d}_x2": run(net, t) for d, t in dtypes.items()
                for name, net in (("eager", model), ("compiled", compiled))}
    times, peaks, _ = _time_variants(variants, device, sizes.repeats)
    return {"resampled_shape_zyx": shape, "seconds": _medians(times), "peak_allocated_mb": peaks,
            "phase_including_compilation_s": round(time.perf_counter() - start, 1)}


def phase_predictor(work: Path, device: torch.device, sizes: Sizes) -> dict:
    """panseg's predictor as users load it, eager against `infer.compile=true`, on synthetic CTs.

    (a) the sliding window alone on the cropped, resampled 300-slice CT, against MONAI (x2 = 2 windows
    per pass); (b) `predict_case` (read to write) of three CTs of 300, 200 and 120 slices, the
    compiled predictor's first case holding its compilation.
    """
    from panseg.inference.predictor import load_predictor, predict_case
    from panseg.io import write_volume
    from panseg.training.checkpoint import TrainingState, save_checkpoint

    cfg, model, _classes, image, shape = _sw_setup(device, sizes)
    checkpoint = save_checkpoint(TrainingState(cfg, 0, {k: v.cpu() for k, v in model.state_dict().items()},
                                               None, None), work / "random_model")
    del model
    icfg = cfg.infer
    settings = {"eager": icfg, "compiled": dataclasses.replace(icfg, compile=True),
                "compiled_x4": dataclasses.replace(icfg, compile=True, windows_per_batch=4)}
    predictors = {name: load_predictor(checkpoint, device, infer, threads=4) for name, infer in settings.items()}
    dtype = predictors["eager"].logits_fn.autocast_dtype
    raw_model = predictors["eager"].logits_fn.model
    variants = {f"panseg_{name}": (lambda p: lambda: p.logits_fn(image))(p) for name, p in predictors.items()}
    variants["monai_fp32_x2"] = _monai(raw_model, image, cfg, icfg.windows_per_batch, None)
    if dtype is not None:
        variants["monai_bf16_x2"] = _monai(raw_model, image, cfg, icfg.windows_per_batch, dtype)
    start = time.perf_counter()
    times, peaks, _ = _time_variants(variants, device, sizes.repeats)
    seconds = _medians(times)
    window_phase_s = time.perf_counter() - start
    ct = _bench_module("infer").make_ct(sizes.crop_z_slices)
    paths = []
    for z in sorted({sizes.crop_z_slices, max(8, sizes.crop_z_slices * 2 // 3), max(6, sizes.crop_z_slices * 2 // 5)},
                    reverse=True):
        path = work / "synthetic" / f"ct{z}_0000.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        sub = dataclasses.replace(ct, array=np.ascontiguousarray(ct.array[:z]))
        write_volume(sub, path)
        paths.append(path)
    cases: dict[str, list[dict]] = {}
    for name in ("eager", "compiled"):
        cases[name] = [predict_case(predictors[name], path, work / "synthetic" / f"{name}_{path.name}")
                       for path in paths]
    keys = ("case_id", "seconds", "network_s", "gpu_peak_mb", "gpu_area_mb_s", "resampled_shape_zyx")
    return {"precision": str(dtype), "resampled_shape_zyx": shape, "seconds": seconds, "peak_allocated_mb": peaks,
            "time_ratio_vs_monai_fp32_x2": {k: round(v / seconds["monai_fp32_x2"], 3) for k, v in seconds.items()},
            "window_phase_s": round(window_phase_s, 1),
            "cases": {name: [{k: r[k] for k in keys} for r in rows] for name, rows in cases.items()}}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def machine_facts(device: torch.device) -> dict:
    facts = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
             "cpu_cores": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1e9, 1),
                      "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                      "cudnn": torch.backends.cudnn.version()})
        try:
            facts["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            facts["nvidia_smi"] = f"unavailable: {err}"
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out", required=True, help="folder for gpu.json (and the work folder unless --work)")
    parser.add_argument("--work", default=None, help="where the cohort, store, run and predictions go")
    parser.add_argument("--quick", action="store_true", help="toy sizes (tiny preset, small phantoms): a CPU rehearsal")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes for the cohort")
    parser.add_argument("--only", nargs="+", choices=PHASES, default=None,
                        help="phases to run (default: all; predict, monai and crop need train, which needs the cohort)")
    args = parser.parse_args(argv)
    sizes = Sizes.of(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"machine": machine_facts(device), "sizes": dataclasses.asdict(sizes)}
    print(json.dumps(result["machine"]), flush=True)

    def record(name: str, fn) -> dict | None:
        start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # record and go on: the other phases still measure
            result[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        result[name]["phase_s"] = round(time.perf_counter() - start, 1)
        (out / "gpu.json").write_text(json.dumps(result, indent=2, default=str))
        shown = {k: v for k, v in result[name].items() if k not in ("traceback", "cases", "all_seconds", "shapes_zyx")}
        print(f"{name}: {json.dumps(shown, default=str)[:1500]}", flush=True)
        return result[name]

    wanted = set(args.only or PHASES)
    val_ids: list[str] = []
    if "train" in wanted and "error" not in record("cohort", lambda: phase_cohort(work, sizes, args.workers)):
        val_ids = record("train", lambda: phase_train(work, sizes)).get("val_ids", [])
    if "step" in wanted:
        record("step", lambda: phase_step(sizes, device))
    if val_ids and "predict" in wanted:
        record("predict", lambda: phase_predict(work, device, val_ids))
    if val_ids and "monai" in wanted:
        record("monai", lambda: phase_monai(work, device, val_ids, sizes.repeats))
    if val_ids and "crop" in wanted:
        record("crop", lambda: phase_crop(work, device, sizes.crop_z_slices, sizes.repeats))
    if "sw" in wanted:
        record("sw", lambda: phase_sw(device, sizes))
    if "compile" in wanted:
        record("compile", lambda: phase_compile(device, sizes))
    if "predictor" in wanted:
        record("predictor", lambda: phase_predictor(work, device, sizes))
    failed = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    print(f"done; failed phases: {failed or 'none'}; results in {out / 'gpu.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

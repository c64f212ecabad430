"""Benchmark of inference: panseg's predictor vs MONAI's sliding window, and the crop's effect (CPU).

    python bench/infer.py --out bench/results/infer.json            # the default run, ~6-8 min on 2 cores
    python bench/infer.py --z-slices 61 --skip-monai-uncropped       # shorter
    python bench/infer.py --only panseg_sw monai_sw panseg_sw_compiled --out bench/results/infer_compiled.json
    python bench/infer.py --cpu-side --out bench/results/case_cpu_infer.json   # ~1 min: the CPU side of a case

--cpu-side measures only the CPU side of predicting one case, today's code against issue 18's in the
same run (bench/_case_cpu.py): read -> crop -> resample -> clip (SimpleITK read and the paper's crop vs
the ISA-L read and crop_method body), and paste back -> write, on a realistic phantom case and on it
tiled to 300 x 512 x 512.

The network is the paper's (preset 'paper': 30.8M parameters, window 96x128x160, step 7/8, Gaussian
sigma 1/8, 2 windows per forward pass), random weights fixed by seed 0, fp32 on CPU.

The CT is synthetic (numpy): 512x512 slices at 0.8x0.8 mm, 2.5 mm apart, int16; a body ellipse
covering ~70% of the field's width (soft tissue 55 HU with noise sd 20, a -100 HU fat rim, a 400 HU
spine), and a separate table slab at 200 HU under it. A full 300-slice CT costs ~8-13 s per window
on this CPU, 24 windows cropped and 54 uncropped, so the network is run on a shorter CT of
`--z-slices` slices (default 61: 152.5 mm, one window along z after resampling); the full 300-slice
CT is only prepared (crop + resampling timed) and its window counts reported.

Every measurement runs in a fresh Python process (peak RSS = that process's VmHWM, reset just
before the measured call; the model and the input are loaded before):
    prepare_full     crop + resample of the full 300-slice CT, with and without crop
    panseg_sw        panseg's sliding window (`NetworkLogits`) on the cropped, resampled, scaled volume
    monai_sw         `monai.inferers.sliding_window_inference` on the same tensor, same weights, window,
                     overlap 1/8, mode 'gaussian', sigma_scale 0.125, sw_batch_size = windows_per_batch
    panseg_sw_compiled  panseg_sw with `infer.compile=true` (torch.compile, Inductor freezing on the CPU):
                     the first call (compilation + prediction) is reported apart as `first_call`; the
                     figures are the second call's, as every later case of a folder would see
    panseg_crop      panseg's whole `predict_volume` (crop, resample, network, argmax, paste back)
    panseg_nocrop    the same with preprocess.crop_method = 'none'
    monai_uncropped  MONAI's sliding window on the uncropped resampled volume (what predict_volume
                     without the paper's crop would feed a network)
panseg's and MONAI's logits are compared voxel by voxel. The window positions are the same here and
both sample the same Gaussian, but MONAI clamps it below at 1e-3 and panseg (as nnU-Net) at its
smallest positive value (~6e-11), so near a window's border the blends differ; with random weights,
whose class logits are nearly tied, that flips the argmax of some voxels where windows overlap. Other processes on the
machine add noise to wall times; CPU seconds (user + sys of the measuring process) are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPACING_ZYX_MM = (2.5, 0.8, 0.8)
SLICE_SHAPE = (512, 512)
WORKERS = ("prepare_full", "panseg_sw", "monai_sw", "panseg_sw_compiled", "panseg_crop", "panseg_nocrop",
           "monai_uncropped")


def make_ct(z_slices: int, seed: int = 0):
    """The synthetic CT (see the module docstring) as a panseg Volume."""
    from panseg.io import Volume

    h, w = SLICE_SHAPE
    y, x = np.ogrid[:h, :w]
    cy, cx, ry, rx = 0.45 * h, 0.5 * w, 0.25 * h, 0.35 * w
    r = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
    template = np.full(SLICE_SHAPE, -1000, dtype=np.int16)
    template[r <= 1.0] = -100  # fat rim
    template[r <= 0.8] = 55  # soft tissue
    template[((y - (cy + 0.6 * ry)) / 22) ** 2 + ((x - cx) / 18) ** 2 <= 1.0] = 400  # spine
    table_top = int(cy + ry + 12)
    template[table_top:table_top + 14, int(0.08 * w):int(0.92 * w)] = 200  # table, an air gap below the body
    soft = template == 55
    rng = np.random.default_rng(seed)
    ct = np.empty((z_slices, h, w), dtype=np.int16)
    for k in range(z_slices):
        ct[k] = template
        ct[k][soft] = np.clip(55 + 20 * rng.standard_normal(int(soft.sum())), -1000, 3000).astype(np.int16)
    return Volume(ct, SPACING_ZYX_MM, (-204.4, -204.4, -800.0))


def windows_of(shape_zyx, window_zyx, step_fraction: float) -> int:
    from panseg.inference.sliding_window import window_starts

    count = 1
    for size, win in zip(shape_zyx, window_zyx):
        count *= len(window_starts(max(size, win), win, step_fraction))
    return count


# ----------------------------------------------------------------------------------------------
# Worker side (one measurement per process)
# ----------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _measure(fn):
    """Run fn() once: wall and CPU seconds, RSS before and peak RSS during (VmHWM reset first)."""
    from panseg.inference.resource_monitor import peak_rss_mb, reset_peak_rss

    before = _rss_mb()
    reset_peak_rss()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return result, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "rss_before_mb": round(before),
                    "peak_rss_mb": round(peak_rss_mb())}


def _unit_tensor(prepared, clip_hu):
    import torch

    low, high = clip_hu
    image = torch.from_numpy(prepared.image_hu.astype(np.float32))
    return image.sub_(low).mul_(1.0 / (high - low)).clamp_(0.0, 1.0)[None, None]  # (1, 1, D, H, W)


def _monai_model(checkpoint: str):
    from panseg.training.checkpoint import load_checkpoint
    from panseg.training.parts import make_model

    state = load_checkpoint(checkpoint)
    model = make_model(state.cfg)
    model.load_state_dict(state.model)
    model.deep_supervision = False
    model.requires_grad_(False)
    return model.eval(), state.cfg


def _monai_logits(model, cfg, image):
    import torch
    from monai.inferers import sliding_window_inference

    icfg = cfg.infer
    with torch.inference_mode():
        return sliding_window_inference(image, roi_size=cfg.train.patch_size_zyx, sw_batch_size=icfg.windows_per_batch,
                                        predictor=model, overlap=1.0 - icfg.step_fraction, mode="gaussian",
                                        sigma_scale=icfg.gaussian_sigma_scale, padding_mode="constant", cval=0.0)[0]


def run_worker(name: str, workdir: Path) -> dict:
    import dataclasses

    from panseg.inference.predictor import load_predictor, prepare_volume

    predictor = load_predictor(workdir / "model", device="cpu")
    cfg = predictor.cfg
    nocrop = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, crop_method="none"))
    window, step = cfg.train.patch_size_zyx, cfg.infer.step_fraction
    out: dict = {"worker": name}
    if name == "prepare_full":
        ct = make_ct(300)
        for label, pcfg in (("crop", cfg.preprocess), ("nocrop", nocrop.preprocess)):
            prepared, stats = _measure(lambda: prepare_volume(ct, pcfg))
            out[label] = {**stats, "crop_box_zyx": prepared.box.to_list(), "crop_reason": prepared.crop_reason,
                          "seconds": {k: round(v, 2) for k, v in prepared.seconds.items()},
                          "resampled_shape_zyx": list(prepared.resampled.shape_zyx),
                          "windows": windows_of(prepared.resampled.shape_zyx, window, step)}
            del prepared
        return out
    ct = np.load(workdir / "ct.npy")
    from panseg.io import Volume

    volume = Volume(ct, SPACING_ZYX_MM, (-204.4, -204.4, -800.0))
    if name in ("panseg_crop", "panseg_nocrop"):
        chosen = predictor if name == "panseg_crop" else predictor.with_config(nocrop)
        prediction, stats = _measure(lambda: chosen.predict_volume(volume))
        shape = prediction.resampled_shape_zyx
        return {**out, **stats, "seconds": {k: round(v, 2) for k, v in prediction.seconds.items()},
                "crop_reason": prediction.crop_reason, "resampled_shape_zyx": list(shape),
                "windows": windows_of(shape, window, step), "tumor_voxels": int(prediction.volume.array.sum())}
    prepared = prepare_volume(volume, (nocrop if name == "monai_uncropped" else cfg).preprocess)
    image = _unit_tensor(prepared, cfg.preprocess.clip_hu)
    if name == "panseg_sw":
        logits, stats = _measure(lambda: predictor.logits_fn(image))
    elif name == "panseg_sw_compiled":
        compiled = predictor.with_config(dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, compile=True)))
        _, first = _measure(lambda: compiled.logits_fn(image))
        logits, stats = _measure(lambda: compiled.logits_fn(image))
        stats["first_call"] = first
    else:
        model, mcfg = _monai_model(str(workdir / "model"))
        logits, stats = _measure(lambda: _monai_logits(model, mcfg, image))
    if name != "monai_uncropped":  # kept for the comparison of the logits
        np.save(workdir / f"{name}_logits.npy", logits.numpy())
    shape = prepared.resampled.shape_zyx
    return {**out, **stats, "resampled_shape_zyx": list(shape), "windows": windows_of(shape, window, step)}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def spawn(name: str, workdir: Path) -> dict:
    start, load = time.perf_counter(), _load()
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--workdir", str(workdir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(process_s=round(time.perf_counter() - start, 1), load_before=load, load_after=_load())
    print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def setup(workdir: Path, z_slices: int) -> None:
    import torch

    from panseg.config import preset
    from panseg.training.checkpoint import TrainingState, save_checkpoint
    from panseg.training.model import count_parameters
    from panseg.training.parts import make_model

    torch.manual_seed(0)
    cfg = preset("paper")
    model = make_model(cfg)
    assert count_parameters(model) == 30_796_459
    save_checkpoint(TrainingState(cfg, 0, model.state_dict(), None, None), workdir / "model")
    np.save(workdir / "ct.npy", make_ct(z_slices).array)


def equivalence_check() -> dict:
    """panseg's vs MONAI's sliding window with the tiny preset's network on a 50x90x100 volume: the
    largest logit difference with MONAI's own Gaussian, and with panseg's importance map handed to
    MONAI (`roi_weight_map`), which should leave only float rounding."""
    import torch
    from monai.inferers import sliding_window_inference

    from panseg.config import preset
    from panseg.inference.predictor import NetworkLogits
    from panseg.inference.sliding_window import gaussian_importance
    from panseg.training.parts import make_model, num_classes_of

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = make_model(cfg).eval()
    model.deep_supervision = False
    image = torch.rand(1, 1, 50, 90, 100)
    window, icfg = cfg.train.patch_size_zyx, cfg.infer
    ours = NetworkLogits(model, window, num_classes_of(cfg), icfg, torch.device("cpu"))(image)
    kwargs = dict(roi_size=window, sw_batch_size=icfg.windows_per_batch, predictor=model,
                  overlap=1.0 - icfg.step_fraction, mode="gaussian", sigma_scale=icfg.gaussian_sigma_scale)
    with torch.inference_mode():
        monai_own = sliding_window_inference(image, **kwargs)[0]
        same_map = sliding_window_inference(image, roi_weight_map=gaussian_importance(window, icfg.gaussian_sigma_scale),
                                            **kwargs)[0]
    return {"max_abs_difference_monai_gaussian": float((ours - monai_own).abs().max()),
            "max_abs_difference_same_importance_map": float((ours - same_map).abs().max())}


def summarize(results: dict, workdir: Path) -> dict:
    def compare(a: str, b: str) -> dict | None:
        fa, fb = workdir / f"{a}_logits.npy", workdir / f"{b}_logits.npy"
        if not (fa.exists() and fb.exists()):
            return None
        la, lb = np.load(fa), np.load(fb)
        return {"mean_abs_logit": float(np.abs(la).mean()), "mean_abs_difference": float(np.abs(la - lb).mean()),
                "max_abs_difference": float(np.abs(la - lb).max()),
                "argmax_agreement": float(np.mean(la.argmax(0) == lb.argmax(0)))}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in results or b not in results:
            return None
        return round(results[a][key] / results[b][key], 3)

    return {
        "sliding_window_time_ratio_panseg_over_monai": ratio("panseg_sw", "monai_sw", "wall_s"),
        "sliding_window_cpu_ratio_panseg_over_monai": ratio("panseg_sw", "monai_sw", "cpu_s"),
        "sliding_window_peak_rss_ratio_panseg_over_monai": ratio("panseg_sw", "monai_sw", "peak_rss_mb"),
        "compiled_sliding_window_time_ratio_over_monai": ratio("panseg_sw_compiled", "monai_sw", "wall_s"),
        "compiled_sliding_window_cpu_ratio_over_monai": ratio("panseg_sw_compiled", "monai_sw", "cpu_s"),
        "compiled_sliding_window_peak_rss_ratio_over_monai": ratio("panseg_sw_compiled", "monai_sw", "peak_rss_mb"),
        "crop_time_ratio_with_over_without": ratio("panseg_crop", "panseg_nocrop", "wall_s"),
        "crop_cpu_ratio_with_over_without": ratio("panseg_crop", "panseg_nocrop", "cpu_s"),
        "predict_volume_with_crop_over_monai_uncropped_sw": ratio("panseg_crop", "monai_uncropped", "wall_s"),
        "predict_volume_with_crop_over_monai_uncropped_sw_cpu": ratio("panseg_crop", "monai_uncropped", "cpu_s"),
        "logits_panseg_vs_monai": compare("panseg_sw", "monai_sw"),
        "logits_compiled_vs_eager": compare("panseg_sw_compiled", "panseg_sw"),
        "cpu_s_per_window": {k: round(v["cpu_s"] / v["windows"], 1) for k, v in results.items() if "windows" in v},
    }


def cpu_side(args: argparse.Namespace) -> None:
    """The --cpu-side rows, written to --out and printed as a table."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _case_cpu

    _case_cpu.one_thread()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core {platform.machine()} VM",
               "command": " ".join(["python", "bench/infer.py", *sys.argv[1:]]), "load_before": os.getloadavg(),
               "cases": {}}
    with tempfile.TemporaryDirectory(prefix="panseg-bench-infer-") as tmp:
        for name, path in _case_cpu.write_inputs(Path(tmp)).items():
            results["cases"][name] = _case_cpu.infer_rows(path, Path(tmp), args.repeats)
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(_case_cpu.markdown(results["cases"]))
    print(f"load average before {results['load_before']}, after {results['load_after']}; written to {args.out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/infer.json"))
    parser.add_argument("--z-slices", type=int, default=61, help="slices of the CT the network runs on")
    parser.add_argument("--skip-monai-uncropped", action="store_true")
    parser.add_argument("--only", nargs="+", choices=WORKERS, default=None, help="run these measurements only")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-side", action="store_true", help="only the CPU side of one case (bench/_case_cpu.py)")
    parser.add_argument("--repeats", type=int, default=5, help="--cpu-side: runs per row (minimum reported)")
    args = parser.parse_args(argv)
    if args.cpu_side:
        cpu_side(args)
        return
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.workdir)))
        return
    import torch

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="panseg-bench-infer-") as tmp:
        workdir = Path(tmp)
        setup(workdir, args.z_slices)
        names = [n for n in (args.only or WORKERS) if not (n == "monai_uncropped" and args.skip_monai_uncropped)]
        results = {name: spawn(name, workdir) for name in names}
        report = {
            "what": __doc__, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                         "torch": torch.__version__, "python": platform.python_version()},
            "case": {"shape_zyx": [args.z_slices, *SLICE_SHAPE], "spacing_zyx_mm": list(SPACING_ZYX_MM),
                     "full_case_shape_zyx": [300, *SLICE_SHAPE]},
            "results": results, "summary": summarize(results, workdir),
            "equivalence_tiny_network": equivalence_check(),
            "total_s": round(time.perf_counter() - start, 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()

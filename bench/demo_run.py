"""The README's demo figures: `panseg demo` as written, timed, with the memory of its whole process tree.

    python bench/demo_run.py --out bench/results/demo_run.json -- --workdir /tmp/demo_work   # nothing else running

Everything after `--` is passed to `panseg demo`. The command runs as a child process; the
sampler walks its process tree every 2 s (the driver, Ray's GCS and raylet, and every Ray worker:
preprocessing actors, the training worker, predictor actors) and sums the resident memory of the
tree two ways: RSS (counts shared pages once per process, an upper bound) and, every 5th sample, PSS
(shared pages split between the processes that map them, what the tree costs the machine). The
sampler runs at niceness 19 and costs ~2% of a core. Linux only (/proc). Output: wall seconds,
exit code, peak tree RSS and PSS, the largest single process's RSS, and the verdict the demo wrote
(WORKDIR/verdict.txt), printed and written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kib(pid: int) -> int:
    """RSS of one process in KiB (/proc/PID/statm: cheap); 0 once it has ended."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kib(pid: int) -> int:
    """PSS of one process in KiB (/proc/PID/smaps_rollup walks its page tables: dearer); 0 once it has ended."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f.readlines()[1:])  # after the address-range line
        return int(fields["Pss"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0


def sample_tree(root: int, with_pss: bool = True) -> tuple[int, int, int]:
    """(tree RSS, tree PSS or 0 without `with_pss`, largest process RSS) in KiB."""
    pids = _descendants(root)
    rss = [_rss_kib(pid) for pid in pids]
    return sum(rss), sum(_pss_kib(pid) for pid in pids) if with_pss else 0, max(rss, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between memory samples (PSS every 5th)")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER, help="-- then the arguments of panseg demo")
    args = parser.parse_args(argv)
    demo_args = [a for a in args.demo_args if a != "--"] if args.demo_args[:1] == ["--"] else args.demo_args
    command = [str(Path(sys.executable).parent / "panseg"), "demo", *demo_args]  # the README's command
    started = time.perf_counter()
    child = subprocess.Popen(command)
    os.nice(19)  # the sampler yields to the demo (whose Ray workers run at Ray's niceness, 15)
    peak, samples = [0, 0, 0], 0
    while child.poll() is None:
        peak = [max(a, b) for a, b in zip(peak, sample_tree(child.pid, with_pss=samples % 5 == 0))]
        samples += 1
        time.sleep(args.interval)
    wall = time.perf_counter() - started
    workdir = Path(demo_args[demo_args.index("--workdir") + 1]) if "--workdir" in demo_args else Path("demo_work")
    verdict = workdir / "verdict.txt"
    result = {"command": "panseg demo " + " ".join(demo_args), "date": time.strftime("%Y-%m-%d"),
              "host": platform.node(), "cpu_cores": os.cpu_count(), "exit_code": child.returncode,
              "wall_seconds": round(wall, 1), "peak_tree_rss_gib": round(peak[0] / 2**20, 2),
              "peak_tree_pss_gib": round(peak[1] / 2**20, 2), "peak_process_rss_gib": round(peak[2] / 2**20, 2),
              "verdict": verdict.read_text() if verdict.is_file() else None}
    print(json.dumps({k: v for k, v in result.items() if k != "verdict"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())

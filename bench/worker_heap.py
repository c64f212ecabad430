"""Why preprocessing workers keep their heap: page faults per case with and without it.

    python bench/worker_heap.py

Writes one synthetic 300x512x512 int16 CT (0.8 x 0.8 x 2.5 mm, body at 60 HU with noise, a table
slab), then runs `preprocess_case` on it three times in one process pinned to one CPU, as a Ray
worker would for consecutive cases: once with glibc's default malloc settings and once with
`panseg.data_pipeline.WORKER_ENV`. Prints wall, user and system seconds and minor page faults per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, os, resource, sys, time
import numpy as np
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from panseg.config import preset
from panseg.io import CaseFiles, Volume, write_volume
from panseg.preprocessing.case import preprocess_case
path = sys.argv[1]
if not os.path.exists(path):
    rng = np.random.default_rng(0)
    ct = np.full((300, 512, 512), -1000, np.int16)
    yy, xx = np.ogrid[:512, :512]
    ct[:, ((yy - 240) / 170.0) ** 2 + ((xx - 256) / 190.0) ** 2 < 1] = 60
    ct += rng.normal(0, 15, ct.shape).astype(np.int16)
    ct[:, 430:440, 100:400] = 200
    write_volume(Volume(ct, (2.5, 0.8, 0.8)), path)
    del ct
case, cfg = CaseFiles("bench", path), preset("paper").preprocess
for i in range(3):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    preprocess_case(case, cfg)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"case": i + 1, "wall_s": round(time.perf_counter() - t0, 2),
                      "user_s": round(r1.ru_utime - r0.ru_utime, 2), "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
                      "page_faults": r1.ru_minflt - r0.ru_minflt}), flush=True)
"""


def main() -> int:
    from panseg.data_pipeline import WORKER_ENV

    with tempfile.TemporaryDirectory(prefix="panseg-heap-") as tmp:
        path = os.path.join(tmp, "bench_0000.nii.gz")
        for name, extra in (("glibc defaults", {}), ("WORKER_ENV", WORKER_ENV)):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env.update(extra, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, "-c", _CHILD, path], env=env, capture_output=True, text=True,
                                 check=True).stdout
            for line in out.splitlines():
                print(name, json.loads(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

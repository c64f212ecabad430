"""What the Ray shells (preprocessing, prediction) share: joining or starting Ray, a quiet Ray Data
context, and one progress line over a stream of result rows.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Use the Ray already initialised in this process, else join `address` (or RAY_ADDRESS, which
    `ray job submit` sets) or start a local Ray with `num_cpus`; shut down on exit only what was
    started here. `num_cpus` is ignored when joining a cluster (its nodes say what they have).
    """
    import os

    import ray

    started_here = not ray.is_initialized()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if started_here:
        ray.init(address=address, num_cpus=None if address else num_cpus, log_to_driver=False,
                 include_dashboard=False if not address else None)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # panseg prints one line of its own (Progress)
        _hide_progress_bar_notice()
        ctx.print_on_execution_start = False
        yield
    finally:
        if started_here:
            ray.shutdown()


class _DropNotice:
    """A logging filter that drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _drop_notice(logger_name: str, prefix: str) -> None:
    """Drop `logger_name`'s messages that start with `prefix` (once, however often it is called)."""
    import logging

    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropNotice(prefix))


def _hide_progress_bar_notice() -> None:
    """Ray Data's warning that progress bars are off (panseg turns them off on purpose)."""
    _drop_notice("ray.data._internal.progress", "Progress bars disabled")


def hide_token_auth_notice() -> None:
    """Ray's notice that a new local cluster has token authentication on (Ray 2.60 turns it on, and makes
    a token in ~/.ray/auth_token, when RAY_AUTH_MODE is unset): the demo keeps that default, quietly."""
    _drop_notice("ray._private.authentication.authentication_token_setup",
                 "Token authentication is enabled for this Ray cluster")


class Progress:
    """One line on stderr: cases done/total, failed, rate, ETA."""

    def __init__(self, stage: str, total: int, enabled: bool = True) -> None:
        self.stage, self.total, self.enabled = stage, total, enabled
        self.done = self.failed = 0
        self.start = time.perf_counter()

    def update(self, row: dict) -> None:
        self.done += 1
        self.failed += row["status"] == "failed"
        if not self.enabled:
            return
        per_case = (time.perf_counter() - self.start) / self.done
        end = "\n" if self.done == self.total else ""
        print(f"\r{self.stage}: {self.done}/{self.total} cases, {self.failed} failed, {per_case:.1f} s/case, "
              f"ETA {per_case * (self.total - self.done):.0f} s   ", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.done < self.total:
            print(file=sys.stderr)


def collect_rows(dataset, meter: Progress) -> list[dict]:
    """Stream a dataset whose rows carry one JSON result each (`row_json`), updating the meter."""
    rows = []
    for out in dataset.iter_rows():
        row = json.loads(out["row_json"])
        rows.append(row)
        meter.update(row)
    meter.close()
    return rows

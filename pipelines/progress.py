"""Progress lines for the platform's jobs: one bar per stage that redraws itself in place.

``TrainingProgress`` follows a training run from its MLflow metrics (rank 0 logs them every
``train.log_every`` steps): step, training bits/byte, the last validation bits/byte, K, C, S, and
the time left, as one line. It reads the store from a thread of the driver, so it works the same
for a local run and for a job on a cluster with a tracking server.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any


def bar(total: float, desc: str, unit: str = "it", **kwargs: Any):
    """A tqdm bar on stdout that redraws one line (a plain counter when stdout is no terminal)."""
    from tqdm import tqdm

    fmt = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}"
    kwargs.setdefault("bar_format", fmt)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stdout, mininterval=0.5, **kwargs)


class TrainingProgress:
    """A line that follows a training run in MLflow: ``with TrainingProgress(...): trainer.fit()``."""

    def __init__(self, client, run_id: str, total_steps: int, max_seconds: float | None, interval: float = 1.0):
        self.client, self.run_id, self.interval = client, run_id, interval
        self.by_time = bool(max_seconds)  # a time budget: the bar counts seconds, and ETA is exact
        self.total = float(max_seconds) if max_seconds else float(total_steps)
        self.stop = threading.Event()
        self.bar = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TrainingProgress:
        fmt = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} s of training [{elapsed}] {postfix}"
        self.bar = (
            bar(round(self.total), "train", "s", bar_format=fmt) if self.by_time else bar(self.total, "train", "step")
        )
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.update()
        self.bar.close()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.update()
            except Exception:  # noqa: BLE001 - a display must never stop the run it shows
                pass

    def update(self) -> None:
        run = self.client.get_run(self.run_id).data.metrics
        if "bpb" not in run:
            return
        step = self.client.get_metric_history(self.run_id, "bpb")[-1].step  # metrics carry their step
        done = run.get("seconds", 0.0) if self.by_time else step
        self.bar.n = min(round(done), round(self.total))
        parts = [f"step {step}"]
        for key, label in (("bpb", "bpb"), ("val_bpb", "val"), ("K", "K"), ("C", "C"), ("S", "S")):
            if key in run and math.isfinite(run[key]):
                parts.append(f"{label} {run[key]:.2f}")
        if self.by_time:  # the budget is known: the time left is exact (tqdm's guess counts startup)
            parts.append(f"{max(0, round(self.total - done))} s left")
        self.bar.set_postfix_str(" ".join(parts), refresh=False)
        self.bar.refresh()

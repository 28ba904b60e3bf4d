"""What of Ray's own records reaches a person's console: its warnings and errors, not its INFO records, which stay in
the session's log files (``/tmp/ray/session_latest/logs``). The stages print their own progress and results.

``quiet_ray`` runs in the driver once Ray is up, ``quiet_process`` in every process of a local cluster as it starts,
``quiet_libraries`` as a stage starts, ``quiet_worker`` in each Ray Train worker before it trains. ``ProgressLine``
is a long step's progress, one line at a time, as a log file or ``ray job logs`` shows it (a progress bar repaints
one line, which a log keeps as one line at the end).
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.util import log_once

RAY_PACKAGE = os.path.dirname(ray.__file__)
# A progress line at least this often (and at the end), however long a step or a log interval is: a person
# watching a run wants to see it move; MLflow keeps every logged step.
PROGRESS_SECONDS = 30.0


class RayInfo(logging.Filter):
    """Keeps a console handler's records but Ray's own below WARNING (by the file that logged them: Ray Train logs
    each report under its file's path, not under ``ray.train``, so no logger name catches them all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(RAY_PACKAGE)


def quiet_ray() -> None:
    """This process's console handlers (the root logger's, Ray's and, once it is loaded, Ray Data's) drop Ray's INFO
    records; their file handlers keep every level."""
    for name in ("", "ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if console and not any(isinstance(f, RayInfo) for f in handler.filters):
                handler.addFilter(RayInfo())


def quiet_process() -> None:
    """Run by every process of a local cluster as it starts (``worker_process_setup_hook``): Ray's INFO records off
    its console, and the cluster's own address in RAY_ADDRESS. Ray's state API, which Ray Train's placement-group
    cleaner asks whether the training's controller is alive, finds its cluster by RAY_ADDRESS or by
    ``/tmp/ray/ray_current_cluster``, which ``ray start`` writes and ``ray.init`` does not: without the address the
    cleaner logs a failure every second, or reaches another cluster of the machine, which does not know the
    controller."""
    quiet_ray()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def quiet_libraries() -> None:
    """No progress bars for diffusers' and transformers' loads and saves, nor for MLflow's artifact transfers: each
    is over in a moment, and in a log every repaint is a line."""
    import diffusers  # here: the driver's data stages never load it
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_worker() -> None:
    """A Ray Train worker has no terminal: Ray's INFO records stay in its log files, the libraries' INFO records
    (botocore finding credentials, ...) off the console Ray Train gives its root logger, and neither Ray Data nor
    the model libraries draw progress bars (each repaint would be a line of the driver's console). The loop's own
    lines are printed."""
    import ray.data  # Ray Data sets up its loggers as it loads: they must exist to be quietened

    quiet_ray()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    quiet_libraries()
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data says once a process that its bars are off; here they are off on purpose.
    log_once("ray_data_progress_manager_disabled")


class ProgressLine:
    """``<what>: <unit> 6/12 (50%), loss 0.9434, 0.18 <unit>s/s, 0m33s left``: at least every ``PROGRESS_SECONDS``
    and at the last one, with the mean loss since the previous line when there is one, the rate over this attempt
    and the time left at that rate."""

    def __init__(self, what: str, total: int, first: int = 0, unit: str = "step", enabled: bool = True):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        # The rate is measured from the first one done, so that start-up (workers, models, the first read) does
        # not stretch the time left; until then, from here.
        self.since = (time.perf_counter(), first)
        self.printed, self.first_done = self.since[0], None
        self.loss, self.count = 0.0, 0

    def update(self, done: int, loss: float | None = None) -> None:
        if loss is not None:
            self.loss, self.count = self.loss + loss, self.count + 1
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = (now, done)
        elif done > self.first_done[1]:
            self.since = self.first_done
        if not self.enabled or (now - self.printed < PROGRESS_SECONDS and done != self.total):
            return
        rate = (done - self.since[1]) / max(now - self.since[0], 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        mean = f", loss {self.loss / self.count:.4f}" if self.count else ""
        print(
            f"{self.what}: {self.unit} {done}/{self.total} ({done / max(self.total, 1):.0%}){mean}, "
            f"{rate:.2f} {self.unit}s/s, {_duration(left)} left",
            flush=True,
        )
        self.printed, self.loss, self.count = now, 0.0, 0


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing done yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"

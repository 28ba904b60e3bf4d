"""What of Ray's own records reaches a person's console: its warnings and errors, not its INFO records, which stay
in the session's log files (``/tmp/ray/session_latest/logs``). The stages print their own progress and results.

``quiet_ray`` runs in the driver once Ray is up, ``quiet_libraries`` as a stage starts, ``quiet_worker`` in each
Ray Train worker before it trains.
"""

from __future__ import annotations

import logging
import os

import ray
import ray.data  # noqa: F401  (Ray Data sets up its loggers as it loads: they must exist to be quietened)
from ray.util import log_once

RAY_PACKAGE = os.path.dirname(ray.__file__)


class RayInfo(logging.Filter):
    """Keeps a console handler's records but Ray's own below WARNING (by the file that logged them: Ray Train logs
    each report under its file's path, not under ``ray.train``, so no logger name catches them all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(RAY_PACKAGE)


def quiet_ray() -> None:
    """This process's console handlers (the root logger's, Ray's and Ray Data's) drop Ray's INFO records; their file
    handlers keep every level."""
    for name in ("", "ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if console and not any(isinstance(f, RayInfo) for f in handler.filters):
                handler.addFilter(RayInfo())


def quiet_libraries() -> None:
    """No progress bars for diffusers' and transformers' loads and saves, nor for MLflow's artifact transfers: each
    is over in a moment, and in a log every repaint is a line."""
    import diffusers  # here: the driver's data stages never load it
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_worker() -> None:
    """A Ray Train worker has no terminal: Ray's INFO records stay in its log files, and neither Ray Data nor the
    model libraries draw progress bars (each repaint would be a line of the driver's console)."""
    quiet_ray()
    quiet_libraries()
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data says once a process that its bars are off; here they are off on purpose.
    log_once("ray_data_progress_manager_disabled")

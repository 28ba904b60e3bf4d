"""The stage registry: a package per stage, ``pipelines/stages/<name>/``, whose ``stage`` module exposes
``run(cfg)``, with ``conf/stage/<name>.yaml`` beside it. A stage's Ray-side code (``remote.py``: Ray Data functions;
``loop.py``: a training loop; ``encoder.py``: an actor) lives in the same package, in modules that import neither
MLflow, Hydra nor the driver."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

STAGES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


class UnknownStageError(ValueError):
    pass


def load(name: str) -> ModuleType:
    if name not in STAGES:
        raise UnknownStageError(f"unknown stage {name!r}; the stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{name}.stage")

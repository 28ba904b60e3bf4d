"""The stage registry: one module per stage, each exposing ``run(cfg)``; ``conf/stage/<name>.yaml`` beside it."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

STAGES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


class UnknownStageError(ValueError):
    pass


def load(name: str) -> ModuleType:
    if name not in STAGES:
        raise UnknownStageError(f"unknown stage {name!r}; the stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{name}")

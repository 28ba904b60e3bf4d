"""The config tree in ``conf/``, composed in-process (tests, benchmarks) as ``pipelines/run.py`` composes it."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(*overrides: str) -> DictConfig:
    """The config `python pipelines/run.py <overrides>` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))

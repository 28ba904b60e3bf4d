"""The config tree in ``conf/``: its schema registered with Hydra, and the tree composed in-process (tests,
benchmarks) as ``pipelines/run.py`` composes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipelines.schema import OPTIONS, Config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def register_schema() -> None:
    """``schema/config`` for the root, ``schema/<group>/<option>`` for each option of ``conf/<group>/``: the
    first entry of that option's defaults list (``- /schema/<group>/<option>@_here_``)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="config", node=Config)
    for group, options in OPTIONS.items():
        for option, node in options.items():
            store.store(group=f"schema/{group}", name=option, node=node)


def compose(*overrides: str) -> DictConfig:
    """The config `python pipelines/run.py <overrides>` would run with."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def plain(node: Any) -> Any:
    """A config node as plain values (choices as their names), every interpolation resolved."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node

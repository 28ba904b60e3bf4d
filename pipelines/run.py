"""Entry point: ``python pipelines/run.py stage=<name> [overrides]``.

Hydra composes ``conf/`` against its schema (``pipelines/schema.py``): a wrong type, an unknown choice or key
is Hydra's error before anything runs. A value left unset (``???``) is reported here, also before anything
runs; then the stage module named by ``stage.name`` runs with the composed config.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

# `python pipelines/run.py` puts pipelines/ on sys.path, not the repository root; `ray job submit
# --working-dir .` runs it from an unpacked copy where the installed package may be older.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from pipelines import stages  # noqa: E402
from pipelines.driver.config import register_schema  # noqa: E402

register_schema()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        stage = stages.load(cfg.stage.name)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (stages.UnknownStageError, OmegaConfBaseException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    stage.run(cfg)
    # Ray's CLI logger calls colorama.init() on import, whose exit hook writes an ANSI reset to a terminal after
    # the stage's last line; nothing here is coloured, so the last line stays the stage's own.
    if "colorama.initialise" in sys.modules:
        atexit.unregister(sys.modules["colorama.initialise"].reset_all)


if __name__ == "__main__":
    main()

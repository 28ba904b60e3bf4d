"""Entry point: ``python pipelines/run.py stage=<name> [overrides]``.

Hydra composes ``conf/``; the stage module named by ``stage.name`` runs with the composed config.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python pipelines/run.py` puts pipelines/ on sys.path, not the repository root; `ray job submit
# --working-dir .` runs it from an unpacked copy where the installed package may be older.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipelines import stages  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        stage = stages.load(cfg.stage.name)
    except stages.UnknownStageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    stage.run(cfg)


if __name__ == "__main__":
    main()

"""The stages: ``ldm`` composed with Ray, MLflow and Hydra. ``driver/`` runs in the process ``pipelines/run.py``
starts, ``worker/`` in Ray's worker processes, ``stages/<name>/`` holds one stage each."""

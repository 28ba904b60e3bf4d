"""Stages of the pipeline: compose `ldm` with Ray, MLflow and Hydra."""

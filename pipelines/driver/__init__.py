"""What runs in the driver, the process ``python pipelines/run.py`` starts: the stage skeleton, the config, the
cluster, MLflow runs, and the Ray Train trainer of the two training stages. Nothing here is imported by a Ray
worker process (``tests/test_layering.py`` checks it)."""

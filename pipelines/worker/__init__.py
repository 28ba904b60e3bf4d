"""What runs inside Ray's worker processes and both training stages share: the checkpoint (``checkpoint``), each
epoch's rows (``data``), logging to the stage's MLflow run (``run_logger``), the pieces of a training loop
(``training``) and what reaches the console from Ray's processes (``console``). Nothing here imports MLflow at
module load, Hydra, or the driver's modules (``tests/test_layering.py`` checks it)."""

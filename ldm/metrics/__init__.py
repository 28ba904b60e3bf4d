"""Evaluation metrics shared by training (held-out checks) and stage=evaluate."""

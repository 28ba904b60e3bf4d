"""Latent diffusion library: models, objectives, data logic, storage. No Ray, no Hydra, no MLflow."""

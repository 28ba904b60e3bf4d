"""Training objectives: the first stage's reconstruction + regulariser + adversarial loss, later the diffusion loss."""

"""stage=train_ldm: the latent diffusion model with Ray Train. ``stage`` drives it; ``loop`` is what each Ray
Train worker runs.

Nothing is imported here: Ray workers import ``train_ldm``'s worker-side modules without the driver's."""

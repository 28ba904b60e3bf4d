"""Model definitions and named presets: the first stage (autoencoders) and, later, the diffusion UNet."""

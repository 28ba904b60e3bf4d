"""stage=encode_latents: prepared images to latent shards. ``stage`` drives it; ``remote`` decodes and writes on Ray
workers; ``encoder`` is the actor holding the first stage.

Nothing is imported here: Ray workers import ``encode_latents``'s worker-side modules without the driver's."""

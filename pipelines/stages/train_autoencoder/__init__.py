"""stage=train_autoencoder: the first stage with Ray Train. ``stage`` drives it; ``remote`` decodes images on Ray
Data workers; ``loop`` is what each Ray Train worker runs.

Nothing is imported here: Ray workers import ``train_autoencoder``'s worker-side modules without the driver's."""

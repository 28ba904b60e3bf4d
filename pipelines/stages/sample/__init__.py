"""stage=sample: images for prompts from a train_ldm output."""

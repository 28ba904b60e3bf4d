"""stage=evaluate: numbers to trust about a train_ldm output. ``stage`` drives it; ``metrics`` holds one object per
metric family."""

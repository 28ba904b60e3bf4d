"""stage=evaluate: numbers to trust about a train_ldm output."""

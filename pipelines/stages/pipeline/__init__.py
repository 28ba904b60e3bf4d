"""stage=pipeline: the stages as one workflow."""

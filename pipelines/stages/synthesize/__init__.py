"""stage=synthesize: a seeded LAION-400M-format corpus. ``stage`` drives it; ``remote`` writes shards on Ray workers.

Nothing is imported here: Ray workers import ``synthesize``'s worker-side modules without the driver's."""

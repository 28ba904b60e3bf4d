"""stage=prepare: filter and tokenize LAION metadata, or images and captions (webdataset tars, parquet). ``stage``
drives it; ``remote`` runs on Ray workers.

Nothing is imported here: Ray workers import ``prepare``'s worker-side modules without the driver's."""

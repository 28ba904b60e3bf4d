"""stage=download: the images of prepare's kept metadata rows, fetched by img2dataset's downloader on the Ray
cluster. ``stage`` drives it; ``remote`` runs one shard per Ray task.

Nothing is imported here: Ray workers import ``download``'s worker-side modules without the driver's."""

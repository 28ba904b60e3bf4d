"""Data logic of the prepare stage: input formats, filters, image probing and the per-file prepare step."""

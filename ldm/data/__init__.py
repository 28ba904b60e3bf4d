"""Data logic: input formats, filters, image probing and the per-file prepare step; downloads; held-out rows;
each epoch's order of the training rows; layouts and inpainting masks."""

"""Text side of the model: the tokenizer every stage shares."""

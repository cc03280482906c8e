"""`prunectl eval`: held-out loss, corpus perplexity and zero-shot accuracy, stored with the model version."""

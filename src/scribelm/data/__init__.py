"""Data: corpora, tokenized shards, batch loaders, and chat / preference datasets for fine-tuning."""

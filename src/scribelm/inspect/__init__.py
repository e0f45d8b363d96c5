"""Looking inside the model: parameter counts, and (later) attention maps, logit lens, embeddings."""

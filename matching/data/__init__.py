"""What goes into a model: caption and query files, tokens and vocabularies, training pairs and batches."""

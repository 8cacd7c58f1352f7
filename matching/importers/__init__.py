"""Other tools' files into ours: SCAN/SGRAF precomputed features, SGRAF checkpoints."""

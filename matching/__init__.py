"""The TSHSR matching model, its training data and its evaluation.

Importing this package is cheap: submodules are imported where they are used
(`matching.model.tshsr`, `matching.retrieval.scoring`, `matching.retrieval.metrics`, …). It needs only
torch, numpy, h5py and nltk, and from `extract` only `extract.shards` and the standard-library
leaves `extract.safeio` and `extract.runtime` (docs/architecture.md).
"""

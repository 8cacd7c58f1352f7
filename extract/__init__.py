"""Region-feature extraction: bottom-up-attention Faster R-CNN to HDF5 shards.

`matching` imports only `extract.shards` (h5py + numpy) and the standard-library leaves
`extract.safeio` and `extract.runtime`; the detector backends import torch, torchvision or
detectron2 where they are used.
"""

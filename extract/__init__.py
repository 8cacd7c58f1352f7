"""Region-feature extraction: bottom-up-attention Faster R-CNN to HDF5 shards.

Only `extract.shards` (h5py + numpy) is imported by `matching`; the detector
backends import torch, torchvision or detectron2 where they are used.
"""

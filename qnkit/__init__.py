"""qnkit: train QuickNAT for kidney segmentation in CT and deploy it fast.

The runtime (this package, without .train/.export) imports no torch.
"""
__version__ = "0.1.0"

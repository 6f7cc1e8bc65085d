"""The EDM family: EDM's pixel-space EDMPrecond networks (``configs/cifar10.py``, ``configs/imagenet64.py``,
``configs/digits.py``)."""

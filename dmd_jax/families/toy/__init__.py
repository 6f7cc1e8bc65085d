"""The toy family: a 2-D Gaussian mixture's exact denoiser as the teacher (``configs/toy2d.py``)."""

"""The Stable Diffusion family: SD 1.x/2.x pipelines in diffusers layout (``configs/coco.py``)."""

"""The Stable Diffusion XL family: SDXL pipelines in diffusers layout (two CLIP text encoders, text_time UNet)."""

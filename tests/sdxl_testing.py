"""Helpers for the Stable Diffusion XL tests: tiny random diffusers / transformers SDXL networks (PyTorch, float32,
eval, every parameter perturbed as ``sd_testing.perturb_`` does) and a tiny SDXL pipeline folder in diffusers
layout written by ``StableDiffusionXLPipeline.save_pretrained``. Nothing is downloaded: the tokenizers are the
library's tiny ones (``dmd_jax.convert.clip.write_tokenizer_files``, and
``dmd_jax.families.sdxl.convert.write_tokenizer_2_files`` for the second, which pads with ``!`` as SDXL's does)."""
from __future__ import annotations

import os

from dmd_jax.convert.clip import write_tokenizer_files
from dmd_jax.families.sdxl import convert as sdxlc
from sd_testing import VAE, perturb_, torch_unet, torch_vae

# SDXL's UNet in miniature: three levels, the first without attention (DownBlock2D / UpBlock2D), per-block
# transformer depths (SDXL: 1, 2, 10) and head counts (SDXL: 5, 10, 20; the first level's unused), linear
# projections, upcast_attention None (as SDXL's config.json has it), text_time conditioning. The cross-attention
# width is the two text encoders' (16 + 32), the added-embedding input 24 (pooled) + 6 time ids x 8.
UNET_XL = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 32), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4), use_linear_projection=True,
    upcast_attention=None, cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=72, addition_embed_type_num_heads=64, norm_num_groups=4)
# SDXL's VAE is SD's with another latent scale.
VAE_XL = dict(VAE, scaling_factor=0.13025, force_upcast=True)
# text_encoder (CLIP ViT-L in SDXL): quick_gelu, pads with end-of-text.
CLIP_L = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63, pad_token_id=63,
    projection_dim=16)
# text_encoder_2 (OpenCLIP ViT-bigG in SDXL): gelu, a projection of the pooled output, pads with "!".
CLIP_G = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="gelu", bos_token_id=62, eos_token_id=63, pad_token_id=56,
    projection_dim=24)
MAX_LENGTH = 16


def torch_clip_text(config=CLIP_L, seed=2):
  """A ``transformers.CLIPTextModel``."""
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(seed)
  return perturb_(CLIPTextModel(CLIPTextConfig(**config)), seed)


def torch_clip_projection(config=CLIP_G, seed=3):
  """A ``transformers.CLIPTextModelWithProjection``."""
  import torch
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection
  torch.manual_seed(seed)
  return perturb_(CLIPTextModelWithProjection(CLIPTextConfig(**config)), seed)


def tokenizers(folder: str):
  """The two tiny ``CLIPTokenizer``s (``model_max_length`` 16; the second padding with ``!``), written under
  ``folder`` and read back."""
  from transformers import CLIPTokenizer
  write_tokenizer_files(os.path.join(folder, "tokenizer"), MAX_LENGTH)
  sdxlc.write_tokenizer_2_files(os.path.join(folder, "tokenizer_2"), MAX_LENGTH)
  return tuple(CLIPTokenizer.from_pretrained(os.path.join(folder, name), local_files_only=True)
               for name in ("tokenizer", "tokenizer_2"))


def write_pipeline(folder: str):
  """A diffusers-layout SDXL folder with tiny random networks, SDXL's scheduler (EulerDiscreteScheduler,
  scaled_linear 0.00085–0.012, epsilon) and ``model_index.json``, all written by
  ``StableDiffusionXLPipeline.save_pretrained``. Returns the pipeline (PyTorch, float32, CPU)."""
  from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
  tok, tok_2 = tokenizers(os.path.join(folder + "-tokenizers"))
  pipe = StableDiffusionXLPipeline(
      vae=torch_vae(VAE_XL), text_encoder=torch_clip_text(), text_encoder_2=torch_clip_projection(),
      tokenizer=tok, tokenizer_2=tok_2, unet=torch_unet(UNET_XL),
      scheduler=EulerDiscreteScheduler.from_config(sdxlc.SDXL_SCHEDULER))
  pipe.save_pretrained(folder)
  return pipe

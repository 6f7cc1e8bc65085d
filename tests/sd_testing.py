"""Helpers for the Stable Diffusion tests: tiny random diffusers / transformers models (PyTorch, float32,
eval) and a tiny pipeline folder in diffusers layout, written with ``save_pretrained``. Nothing is
downloaded: the tokenizer files are the library's tiny ones (``dmd_jax.convert.clip.write_tokenizer_files``;
``write_random_pipeline`` there writes a torch-free random pipeline for the ``:tiny`` configs)."""
from __future__ import annotations

import json
import os

from dmd_jax.families.sd import convert as sdc
from fixture_testing import rel_err  # noqa: F401  (st.rel_err in the SD tests)

# SD 1.x in miniature: int attention_head_dim, 1x1-conv projections, 2 layers per block. The block order is
# the reverse of SD's so that, with UNET_SD2, every block type is tested both with and without resampling.
UNET_SD1 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=24, attention_head_dim=2, norm_num_groups=4)
# SD 2.x in miniature: per-block attention_head_dim, linear projections, upcast attention; plus a
# non-default time embedding (flip_sin_to_cos False, freq_shift 1) and two transformer layers per block.
UNET_SD2 = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=20, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
    flip_sin_to_cos=False, freq_shift=1, transformer_layers_per_block=2, norm_num_groups=4, norm_eps=1e-6)
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
    norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16)
CLIP = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="quick_gelu", bos_token_id=62, eos_token_id=63, pad_token_id=63,
    projection_dim=32)


def perturb_(model, seed: int, scale: float = 0.05):
  """Adds noise to every parameter (so norm scales, biases and zero-initialised layers are all tested)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return model.eval()


def torch_unet(config, seed=0):
  import torch
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  return perturb_(UNet2DConditionModel(**config), seed)


def torch_vae(config=VAE, seed=1):
  import torch
  from diffusers import AutoencoderKL
  torch.manual_seed(seed)
  return perturb_(AutoencoderKL(**config), seed)


def torch_clip(config=CLIP, seed=2):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(seed)
  return perturb_(CLIPTextModel(CLIPTextConfig(**config)), seed)


def write_tokenizer_files(folder: str) -> None:
  """The library's tiny CLIP BPE tokenizer (ids 62 / 63 for the special tokens, to match ``CLIP``)."""
  sdc.write_tokenizer_files(folder)


def write_pipeline(folder: str, unet_config=UNET_SD1, safe_serialization: bool = True):
  """A diffusers-layout SD folder with tiny random networks. Returns ``(unet, vae, text_encoder, tokenizer)``
  (the PyTorch models and the transformers tokenizer)."""
  from diffusers import PNDMScheduler
  from transformers import CLIPTokenizer
  unet, vae, text = torch_unet(unet_config), torch_vae(), torch_clip()
  unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=safe_serialization)
  vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=safe_serialization)
  text.save_pretrained(os.path.join(folder, "text_encoder"))
  if not safe_serialization:  # transformers 5 writes only safetensors: write the .bin (pre-5 key names) here
    import torch
    te = os.path.join(folder, "text_encoder")
    os.remove(os.path.join(te, "model.safetensors"))
    torch.save({"text_model." + k: v for k, v in text.state_dict().items()}, os.path.join(te, "pytorch_model.bin"))
  tok_dir = os.path.join(folder, "tokenizer")  # as in the SD 1.5 release: vocab.json, merges.txt, config
  sdc.write_tokenizer_files(tok_dir, CLIP["max_position_embeddings"])
  tok = CLIPTokenizer(vocab=os.path.join(tok_dir, "vocab.json"), merges=os.path.join(tok_dir, "merges.txt"),
                      model_max_length=CLIP["max_position_embeddings"])
  PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                ).save_pretrained(os.path.join(folder, "scheduler"))
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}, f)
  return unet, vae, text, tok

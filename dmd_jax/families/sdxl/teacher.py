"""Stable Diffusion XL teachers (``configs/sdxl.py``; docs/method.md §7): the SD family's latent VP teacher
(``families/sd/teacher.py``: generator, guided real score, fake score, PNDM / DDIM pairs, VAE, LoRA) with SDXL's
conditioning.

A condition is one array ``[L + 1, D1 + D2]``: rows ``0 .. L-1`` are both text encoders' penultimate hidden
states side by side (CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's, as ``StableDiffusionXLPipeline.encode_prompt``
builds ``prompt_embeds``), row ``L`` holds the second encoder's projected pooled output (``text_embeds``,
width P ≤ D1 + D2) zero-padded. Packing both in one array keeps them together through the prompt-embedding
cache, the batches and the samplers, which all carry one condition array. The UNet gets them apart
(:func:`unet_inputs`) with the six micro-conditioning time ids ``(H, W, 0, 0, H, W)`` at the generated image
size (tianweiy/DMD2 main/sd_unified_model.py ``build_condition_input``: original size = target size =
the training resolution, no crop).

The unconditional input of the guided real score is zeros for both the hidden states and the pooled
embedding, as the official code (main/sd_unified_model.py: ``uncond_embedding = torch.zeros_like(...)`` and
``text_embeds = torch.zeros_like(pooled_text_embedding)``) and the SDXL pipeline's
``force_zeros_for_empty_prompt`` do.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import io, pretrained
from dmd_jax.data.prompts import PromptSet, prompts_from_config
from dmd_jax.families import base
from dmd_jax.families.sd import convert as sdc
from dmd_jax.families.sd import teacher as sd
from dmd_jax.families.sdxl import convert as sdxlc


def pack(prompt_embeds, pooled):
  """``[N, L, D]`` hidden states and ``[N, P]`` pooled embeddings → one condition ``[N, L + 1, D]``."""
  n, _, d = prompt_embeds.shape
  if pooled.shape[-1] > d:
    raise ValueError(f"the pooled embedding's width {pooled.shape[-1]} exceeds the hidden states' {d}")
  row = jnp.zeros((n, 1, d), prompt_embeds.dtype).at[:, 0, :pooled.shape[-1]].set(pooled.astype(prompt_embeds.dtype))
  return jnp.concatenate([prompt_embeds, row], axis=1)


def unet_inputs_for(pooled_width: int, time_ids) -> callable:
  """``cond [N, L + 1, D] -> (prompt_embeds [N, L, D], {'text_embeds': [N, P], 'time_ids': [N, 6]})``, the
  SDXL UNet's conditioning arguments."""
  ids = jnp.asarray(time_ids, jnp.float32)

  def unet_inputs(cond):
    n = cond.shape[0]
    return cond[:, :-1], {"text_embeds": cond[:, -1, :pooled_width],
                          "time_ids": jnp.broadcast_to(ids, (n, ids.shape[-1]))}
  return unet_inputs


def image_time_ids(unet_config: dict, vae_config: dict, latent_resolution: int) -> np.ndarray:
  """``(H, W, 0, 0, H, W)`` at the decoded image size (latent size × the VAE's downsampling factor)."""
  px = latent_resolution * 2 ** (len(vae_config["block_out_channels"]) - 1)
  return sdxlc.time_ids((px, px))


class PackedTextEncoder:
  """Host-side prompt → packed SDXL condition ``[N, L + 1, D1 + D2]`` (module docstring): both tokenizers and
  both frozen text encoders, jitted at a fixed batch so they compile once."""

  def __init__(self, converted: dict, batch_size: int = 256):
    self.tokenizer, self.tokenizer_2 = converted["tokenizer"], converted["tokenizer_2"]
    dev = jax.local_devices()[0]
    (m1, p1), (m2, p2) = converted["text_encoder"], converted["text_encoder_2"]
    self.params = jax.device_put((p1, p2), dev)
    self.batch_size = int(batch_size)
    self.max_length = int(self.tokenizer.model_max_length)

    def encode(params, ids, ids_2):
      embeds, pooled = sdxlc.encode_prompt((m1, params[0]), (m2, params[1]), ids, ids_2)
      return pack(embeds, pooled)
    self._apply = jax.jit(encode)

  def __call__(self, prompts: Sequence[str], dtype=np.float32) -> np.ndarray:
    prompts = list(prompts)
    b = min(self.batch_size, max(len(prompts), 1))
    out = []
    for i in range(0, len(prompts), b):
      chunk = prompts[i:i + b]
      padded = chunk + [""] * (b - len(chunk))
      ids, ids_2 = sdxlc.tokenize(self.tokenizer, padded), sdxlc.tokenize(self.tokenizer_2, padded)
      out.append(np.asarray(jax.device_get(self._apply(self.params, ids, ids_2)))[:len(chunk)].astype(dtype))
    return np.concatenate(out) if out else np.zeros((0, self.max_length + 1, 0), dtype)


def sdxl_teacher(config, configs: dict, unet_shapes, conditions) -> base.Teacher:
  """The ``Teacher`` of an SDXL pipeline from modules only (``configs``: the converted folder's ``config.json``
  dicts by network): :func:`families.sd.teacher.sd_teacher` with SDXL's conditioning."""
  unet_config, vae_config = configs["unet"], configs["vae"]
  res = int(config.model.get("latent_resolution", 0) or unet_config.get("sample_size", 128))
  pooled = int(configs["text_encoder_2"]["projection_dim"])
  inputs = unet_inputs_for(pooled, image_time_ids(unet_config, vae_config, res))
  return sd.sd_teacher(config, unet_config, vae_config, unet_shapes, conditions, name="sdxl",
                       unet_inputs=inputs, cond_rows=2)


def uncond(length: int, width: int) -> np.ndarray:
  """The real score's unconditional input: zeros (hidden states and pooled embedding; module docstring)."""
  return np.zeros((1, length + 1, width), np.float32)


def teacher_dir(config, workdir: str | None) -> str:
  """The folder written by ``python -m dmd_jax.convert sdxl``; ``teacher.path='random'`` writes a tiny
  random-weight SDXL pipeline under the workdir and converts it."""
  return pretrained.network_dir(config.teacher.path, "teacher.path", "sdxl", workdir,
                                lambda dst: sdxlc.write_random_converted(dst, seed=config.seed),
                                marker="text_encoder_2/config.json")


def build(config, workdir: str | None) -> tuple[base.Teacher, dict]:
  """Reads the converted pipeline (``teacher.path``), the LPIPS weights and the prompts, then
  :func:`sdxl_teacher`."""
  path = teacher_dir(config, workdir)
  converted = sdxlc.load_converted_sdxl(path, attention=config.model.attention)
  sd.check_schedule(sd.vp_schedule(config), converted["scheduler_config"], path)
  sdxlc.check_configs(converted["configs"], path)
  encoder = PackedTextEncoder(converted, config.data.embedding_batch_size)
  encoder_id = path if "://" in path else os.path.abspath(path)
  prompts = PromptSet(prompts_from_config(config.data), encoder, workdir, encoder_id, config.data.embedding_dtype)
  conditions = base.PromptConditions(prompts, config.seed, encode_text=encoder)
  unet_params = converted["unet"][1]
  teacher = sdxl_teacher(config, converted["configs"], unet_params, conditions)
  width = int(converted["configs"]["unet"]["cross_attention_dim"])
  frozen = sd.sd_frozen(unet_params, uncond(encoder.max_length, width), converted["vae"][1],
                        base.distance_params(config, workdir))
  return teacher, frozen


def network_configs(config) -> dict:
  """The ``config.json`` dicts of the networks: the converted folder's (``teacher.path``), the tiny random
  pipeline's (``'random'``), or SDXL base 1.0's (no path: the networks ``configs/sdxl.py`` names)."""
  path = config.teacher.path
  names = ("unet", "vae", "text_encoder", "text_encoder_2")
  if path == "random":
    return dict(zip(names, (sdxlc.TINY_UNET, sdxlc.TINY_VAE, sdxlc.TINY_CLIP, sdxlc.TINY_CLIP_2)))
  if not path:
    return dict(zip(names, (sdxlc.SDXL_UNET, sdxlc.SDXL_VAE, sdxlc.SDXL_TEXT, sdxlc.SDXL_TEXT_2)))
  return {name: io.read_json(io.join(path, name, "config.json")) for name in names}


def abstract(config) -> tuple[base.Teacher, dict]:
  """The SDXL teacher from the networks' configs alone, frozen parameters as shapes (``families.abstract``)."""
  cfgs = network_configs(config)
  shapes = lambda module, inputs: jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]
  unet_params, vae_params = shapes(*sdc.build_unet(cfgs["unet"])), shapes(*sdc.build_vae(cfgs["vae"]))
  length = int(cfgs["text_encoder"]["max_position_embeddings"])
  width = int(cfgs["unet"]["cross_attention_dim"])
  n = len(config.data.prompts) or int(config.data.num_prompts) or 1
  conditions = base.PromptConditions(sd.AbstractPrompts(n, length + 1, width), config.seed, encode_text=None)
  frozen = sd.sd_frozen(unet_params, jax.ShapeDtypeStruct((1, length + 1, width), jnp.float32), vae_params,
                        base.abstract_distance_params(config))
  return sdxl_teacher(config, cfgs, unet_params, conditions), frozen

"""An SDXL run's generator for diffusers (``python -m dmd_jax.export``, docs/export.md): the SD family's export
(``families/sd/export.py``) for a ``StableDiffusionXLPipeline``: ``unet/``; with ``--teacher_src`` (the teacher's
original diffusers SDXL folder) also its ``vae/``, both text encoders and tokenizers, ``scheduler/`` and a
``model_index.json``; a LoRA run's adapters alone in ``lora/`` for ``load_lora_weights``.
"""
from __future__ import annotations

from dmd_jax.families.sd import export as sd_export
from dmd_jax.families.sdxl import teacher as sdxl_teacher

SDXL = sd_export.Pipeline(
    class_name="StableDiffusionXLPipeline",
    parts=("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    optional_parts=(),
    teacher_dir=sdxl_teacher.teacher_dir,
    conditioning=(
        "encoder_hidden_states: both text encoders' penultimate hidden states side by side [B, L, D1 + D2] "
        "(StableDiffusionXLPipeline.encode_prompt's prompt_embeds); added_cond_kwargs: text_embeds = the second "
        "encoder's projected pooled output [B, P], time_ids = (H, W, 0, 0, H, W) at the generated image size"),
    unet_inputs=("encoder_hidden_states=prompt_embeds, added_cond_kwargs={'text_embeds': pooled_prompt_embeds, "
                 "'time_ids': time_ids}"))


def check_teacher_src(teacher_src: str) -> None:
  sd_export.check_teacher_src(teacher_src, SDXL)


def write(out_dir: str, run, params, teacher_src: str | None = None) -> dict:
  return sd_export.write(out_dir, run, params, teacher_src, SDXL)


def write_lora(out_dir: str, run, gen_state) -> dict:
  return sd_export.write_lora(out_dir, run, gen_state, SDXL)

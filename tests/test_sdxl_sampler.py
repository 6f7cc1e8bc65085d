"""The SDXL teacher as training builds it (configs/sdxl.py:tiny through ``families.build``: the random tiny pipeline
written and converted under the workdir, the packed prompt conditions, zero unconditional inputs, time ids at the
image size) against diffusers' ``StableDiffusionXLPipeline`` on the same diffusers folder: the guided DDIM sampler
(the regression pairs' teacher) and the guided real score, float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixture_testing import rel_err
from dmd_jax import config_lib, families

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red bus", "two birds"]
GUIDANCE = 8.0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sdxl")
  config = config_lib.load("sdxl", "tiny")
  config.regression.update(distance="mse", sampler="ddim", sampler_steps=3)
  teacher, frozen = families.build(config, str(workdir))
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(workdir / "random_sdxl-source"))
  pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  return config, teacher, frozen, pipe


def test_packed_conditions_are_the_pipelines_prompt_embeddings(built):
  _, teacher, frozen, pipe = built
  cond = np.asarray(teacher.conditions.encode_text(PROMPTS))
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
  p = pooled.shape[-1]
  assert cond.shape == (2, embeds.shape[1] + 1, embeds.shape[2])
  assert rel_err(cond[:, :-1], embeds.numpy()) <= 1e-5
  assert rel_err(cond[:, -1, :p], pooled.numpy()) <= 1e-5 and not cond[:, -1, p:].any()
  # the unconditional input: zeros, as the pipeline's force_zeros_for_empty_prompt and the official code
  assert not np.asarray(frozen["teacher"]["uncond"]).any()


def test_guided_ddim_sampler_matches_the_pipeline(built):
  config, teacher, frozen, pipe = built
  cond = jnp.asarray(teacher.conditions.encode_text(PROMPTS))
  res, _, ch = teacher.sample_shape
  z = jax.random.normal(jax.random.PRNGKey(3), (2, res, res, ch), jnp.float32)
  ours = np.asarray(jax.jit(teacher.sampler.sample)(frozen["teacher"], z, cond))
  with torch.no_grad():
    ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=GUIDANCE, output_type="latent",
               latents=torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy()),
               height=8 * res // 4, width=8 * res // 4).images.numpy().transpose(0, 2, 3, 1)
  assert config.guidance_scale == GUIDANCE and teacher.sampler.spec["sampler"] == "ddim"
  err = rel_err(ours, ref)
  print(f"guided DDIM-3 vs StableDiffusionXLPipeline: rel err {err:.2e}")
  assert err <= 1e-5


def test_real_score_matches_the_pipelines_guided_unet(built):
  _, teacher, frozen, pipe = built
  cond = jnp.asarray(teacher.conditions.encode_text(PROMPTS))
  res, _, ch = teacher.sample_shape
  x_t = jax.random.normal(jax.random.PRNGKey(4), (2, res, res, ch), jnp.float32)
  t = jnp.asarray([999, 400], jnp.int32)
  ours = np.asarray(teacher.real_denoise(frozen["teacher"], x_t, t, cond))
  px = 8 * res // 4
  time_ids = torch.tensor([[px, px, 0, 0, px, px]] * 4, dtype=torch.float32)
  x = torch.from_numpy(np.asarray(x_t).transpose(0, 3, 1, 2).copy())
  tt = torch.from_numpy(np.array(t)).long()
  with torch.no_grad():
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    eps = pipe.unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([neg, embeds]),
                    added_cond_kwargs={"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": time_ids}).sample
  eps_u, eps_c = eps.chunk(2)
  eps = (eps_u + GUIDANCE * (eps_c - eps_u)).double()
  abar = pipe.scheduler.alphas_cumprod.double()[tt].view(-1, 1, 1, 1)
  x0 = ((x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()).numpy().transpose(0, 2, 3, 1)
  err = rel_err(ours, x0)
  print(f"guided real score (x0) vs the pipeline's UNet: rel err {err:.2e}")
  assert err <= 1e-5

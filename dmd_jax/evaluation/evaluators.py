"""Evaluators, built from ``config.evals`` (``{name: dict(type=..., every_steps=..., ...)}``, the dicts of
``config_lib``'s ``*_eval`` builders) and run by the loop (every ``every_steps`` with ``final=False``, and at
the end of training with ``final=True``) and by ``--mode=eval``.

Each is built as ``EVALUATORS[type](run, writer, spec, name)`` and has ``run(generator_params, step, final) ->
results`` (a dict merged into ``metrics.json`` / ``eval_step<N>.json``); it writes its scalars to the run's
metric writer:

- ``toy``: distribution metrics of generator and teacher samples against the true mixture, and a scatter
  PNG (``evaluation/toy.py``);
- ``grid``: a PNG of one-step samples above teacher samples drawn from the same noise;
- ``fid``: FID of ``num_samples`` one-step samples (a monitoring FID of ``periodic_num_samples`` when not
  final) against ``reference_stats`` (docs/method.md §8);
- ``coco``: COCO-30k FID (clean-fid protocol) and CLIP score of text-to-image generators (docs/method.md §8,
  ``evaluation/text_to_image.py``);
- ``digits``: the digits proof's metrics of ``num_samples`` samples in the features of a small classifier
  trained on the digits (FID, class accuracy, k-NN precision / recall, near-copies), the real-vs-real floor,
  and the teacher's (``teacher``) (``evaluation/digits.py``).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from dmd_jax import io, loop, pretrained, sharding, streams
from dmd_jax.data.prompts import prompts_from_config
from dmd_jax.data.toy import GaussianMixture
from dmd_jax.evaluation import fid, sampling
from dmd_jax.evaluation import images as image_io
from dmd_jax.evaluation import text_to_image as t2i
from dmd_jax.evaluation import toy as toy_eval
from dmd_jax.evaluation.digits import DigitsEvaluator
from dmd_jax.evaluation.reference_stats import reference_stats_from_tfds


def _replicated(run, params):
  return jax.device_put(params, sharding.replicated(run.mesh))


def _inception(run, path: str, what: str):
  """``(module, replicated params)`` of the FID Inception at ``path`` (named ``what`` in errors), loaded once
  per run."""
  key = ("inception", path)
  if key not in run.cache:
    module, params = pretrained.inception(path, what, run.config.seed, run.workdir)
    run.cache[key] = (module, _replicated(run, params))
  return run.cache[key]


def _cached_reference(run, cache: str, compute) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the teacher's samples: read from ``cache``, else ``compute()`` and written there."""
  if io.exists(cache):
    ref = fid.load_reference_stats(cache)
    return ref["mu"], ref["sigma"]
  logging.info("FID reference: statistics of the teacher's samples (cached in %s)", cache)
  mu, sigma = compute()
  if run.is_main:
    fid.save_reference_stats(cache, mu, sigma)
  return mu, sigma


class ToyEvaluator:
  """Generator vs teacher samples against the true mixture: TV, precision, mode shares, MMD² (and its floor)."""

  def __init__(self, run, writer, spec, name: str = "toy"):
    self.ctx, self.writer, self.spec = run, writer, spec
    self.mixture = GaussianMixture.from_config(run.config.toy)

  def run(self, params, step, final):
    if not final:
      return {}
    run = self.ctx
    n, seed = self.spec.num_samples, run.config.seed
    gen, _ = sampling.generate(run, params, n, streams.key(seed, "toy_generator"))
    teach, _ = sampling.teacher_samples(run, n, streams.key(seed, "toy_teacher"))
    floor = toy_eval.mmd2_floor(self.mixture, seed)
    results = {"generator": toy_eval.toy_metrics(gen, self.mixture, seed, floor),
               "teacher": toy_eval.toy_metrics(teach, self.mixture, seed, floor)}
    self.writer.write_scalars(step, {f"eval/{who}/{k}": v for who in ("generator", "teacher")
                                     for k, v in results[who].items() if not isinstance(v, list)})
    if run.is_main:
      path = io.join(run.workdir, "samples", f"toy_step{step}.png")
      toy_eval.scatter_png(path, [(f"teacher ({run.teacher.sampler.nfe} NFE)", teach),
                                  (f"generator ({run.generator_nfe} NFE), step {step}", gen)], self.mixture)
      results["samples_png"] = path
    return results


class GridEvaluator:
  """``num_samples`` one-step samples above as many teacher samples from the same noise, one PNG."""

  def __init__(self, run, writer, spec, name: str = "grid"):
    self.ctx, self.spec = run, spec

  def run(self, params, step, final):
    run = self.ctx
    num = self.spec.num_samples
    if not final or num <= 0:
      return {}
    key = streams.key(run.config.seed, "sample_grid")
    gen, _ = sampling.generate(run, params, num, key)
    teach, _ = sampling.teacher_samples(run, num, key)
    gen, teach = sampling.to_outputs(run, gen), sampling.to_outputs(run, teach)
    if not run.is_main:
      return {}
    path = io.join(run.workdir, "samples", f"step{step}.png")
    cols = int(np.ceil(np.sqrt(num)))
    g, t = image_io.grid(image_io.to_uint8(gen), cols), image_io.grid(image_io.to_uint8(teach), cols)
    image_io.save_png(path, np.concatenate([g, np.full((8,) + g.shape[1:], 255, np.uint8), t]))
    return {"samples_png": path}


class FidEvaluator:
  """FID of one-step samples (Inception pool features of uint8 images, data-parallel over the mesh, float64
  statistics) against ``reference_stats``: an .npz with mu / sigma, or 'teacher' (the teacher's own samples,
  cached in the workdir). Inactive without ``inception_path``."""

  def __init__(self, run, writer, spec, name: str = "fid"):
    self.ctx, self.writer, self.spec, self.name = run, writer, spec, name

  def _stats(self, chunks, num: int):
    e = self.spec
    module, params = _inception(self.ctx, e.inception_path, f"evals.{self.name}.inception_path")
    stats = fid.FeatureStats()
    progress = loop.Progress("FID:", num, unit="images")
    for x, _ in chunks:   # every process holds the chunk; each feeds its share, the features are gathered
      images = image_io.to_uint8(sampling.to_outputs(self.ctx, x))[sharding.process_share(len(x))]
      stats.update(fid.inception_features(module, params, images, protocol=e.protocol, batch_size=e.batch_size,
                                          mesh=self.ctx.mesh, log_every=0))
      progress.update(stats.count)
    return stats.mu_sigma()

  def _reference(self):
    run, e = self.ctx, self.spec
    if not e.reference_stats:
      raise ValueError(f"evals.{self.name}.reference_stats is empty: pass an .npz with mu and sigma (e.g. EDM's "
                       f"fid-refs), or 'teacher' for the statistics of the teacher's own samples")
    if e.reference_stats != "teacher":
      ref = fid.load_reference_stats(e.reference_stats)
      return ref["mu"], ref["sigma"]
    cache = io.join(run.workdir, f"fid_reference_teacher_{e.num_samples}.npz")
    return _cached_reference(run, cache, lambda: self._stats(sampling.sample_chunks(
        run, sampling.teacher_fn(run), run.frozen["teacher"], e.num_samples,
        streams.key(run.config.seed, "teacher_reference"), e.batch_size), e.num_samples))

  def fid(self, params, num: int) -> float:
    run = self.ctx
    ref = self._reference()
    mu, sigma = self._stats(sampling.sample_chunks(run, run.sample, params, num,
                                                   streams.key(run.config.seed, "fid"),
                                                   self.spec.batch_size), num)
    return fid.frechet_distance(mu, sigma, *ref)

  def run(self, params, step, final):
    e = self.spec
    if not e.inception_path:
      return {}
    n = e.num_samples if final else e.periodic_num_samples
    if n <= 0:
      return {}
    value = self.fid(params, n)
    self.writer.write_scalars(step, {f"eval/fid{n}": value})
    if final:
      logging.info("FID (%d samples, %s protocol) at step %d: %.4f", n, e.protocol, step, value)
    else:
      logging.info("monitoring FID (%d samples) at step %d: %.4f", n, step, value)
    return {"fid": value, "fid_num_samples": n, "fid_protocol": e.protocol} if final else {}


class CocoEvaluator:
  """Text-to-image: COCO FID under the clean-fid protocol and CLIP score of ``num_samples`` captions
  (``evaluation/text_to_image.py``). Inactive without ``inception_path`` and ``clip_path``."""

  def __init__(self, run, writer, spec, name: str = "coco"):
    self.ctx, self.writer, self.spec, self.name = run, writer, spec, name

  def _clip(self):
    path = self.spec.clip_path
    if not path:
      return None
    key = ("clip", path)
    if key not in self.ctx.cache:
      module, params, tokenizer = pretrained.clip(path, f"evals.{self.name}.clip_path", self.ctx.workdir)
      self.ctx.cache[key] = (module, _replicated(self.ctx, params), tokenizer)
    return self.ctx.cache[key]

  def _inception(self):
    return _inception(self.ctx, self.spec.inception_path, f"evals.{self.name}.inception_path")

  def _captions(self) -> list[str]:
    config = self.ctx.config
    e, n = self.spec, self.spec.num_samples
    if e.captions == "coco_captions":
      return t2i.coco_captions(e.data_dir, e.captions_split, n, self.ctx.workdir)
    if e.captions == "train_prompts":
      base = prompts_from_config(config.data)
    else:
      base = t2i.read_captions(e.captions)
    return [base[i % len(base)] for i in range(n)]

  def _evaluator(self, with_clip: bool):
    e = self.spec
    return t2i.CocoEvaluator(self.ctx.mesh, self._inception() if e.inception_path else None,
                             self._clip() if with_clip else None, e.batch_size, e.clip_resize_256,
                             e.get("image_size", 256))

  def _reference(self, captions):
    run, e = self.ctx, self.spec
    if e.reference_stats == "tfds":
      module, params = self._inception()
      size = e.get("image_size", 256)
      tag = t2i.split_tag(e.reference_split) + ("" if size == 256 else f"_{size}px")
      cache = io.join(run.workdir, f"fid_reference_coco_{tag}.npz")
      return reference_stats_from_tfds("coco_captions", e.reference_split, e.data_dir or None, module, params,
                                       image_size=size,
                                       protocol="clean", batch_size=e.batch_size, mesh=run.mesh, cache_path=cache)
    if e.reference_stats == "teacher":
      cache = io.join(run.workdir,
                      f"fid_reference_teacher_{len(captions)}_{t2i.captions_digest(captions)}.npz")

      def compute():
        chunks = t2i.caption_images(run.teacher, run.frozen, run.mesh, sampling.teacher_fn(run),
                                    run.frozen["teacher"], captions,
                                    streams.key(run.config.seed, "teacher_reference"), e.batch_size)
        return t2i.run(chunks, self._evaluator(with_clip=False), len(captions),
                       "FID reference (teacher)").stats.mu_sigma()
      return _cached_reference(run, cache, compute)
    if not e.reference_stats:
      raise ValueError(f"evals.{self.name}.reference_stats is empty: pass an .npz with mu and sigma, 'tfds' (the "
                       f"COCO images of reference_split) or 'teacher' (the teacher's samples for the same captions)")
    ref = fid.load_reference_stats(e.reference_stats)
    return ref["mu"], ref["sigma"]

  def run(self, params, step, final):
    run, e = self.ctx, self.spec
    if not final or not (e.inception_path or e.clip_path) or e.num_samples <= 0:
      if final:
        logging.info("no evals.%s.inception_path / clip_path: COCO FID and CLIP score skipped", self.name)
      return {}
    captions = self._captions()
    reference = self._reference(captions) if e.inception_path else None
    chunks = t2i.caption_images(run.teacher, run.frozen, run.mesh, run.sample, params, captions,
                                streams.key(run.config.seed, "fid"), e.batch_size)
    ev = t2i.run(chunks, self._evaluator(with_clip=True), len(captions), f"COCO eval, step {step}")
    metrics = ev.result(reference)
    n = len(captions)
    self.writer.write_scalars(step, {f"eval/{k}{n}": v for k, v in metrics.items()})
    logging.info("COCO eval at step %d on %d captions: %s", step, n,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {**metrics, "num_samples": n, "captions": e.captions, "fid_protocol": "clean",
            "reference_stats": e.reference_stats}


EVALUATORS = {"toy": ToyEvaluator, "grid": GridEvaluator, "fid": FidEvaluator, "coco": CocoEvaluator,
              "digits": DigitsEvaluator}


class Named:
  """An evaluator with its config name and period (``config.evals.<name>.every_steps``)."""

  def __init__(self, name: str, every_steps: int, evaluator):
    self.name, self.every_steps, self.evaluator = name, every_steps, evaluator

  def run(self, params, step, final):
    return self.evaluator.run(params, step, final)


def build(run, writer) -> list[Named]:
  """The evaluators of ``config.evals`` in order, those with an empty ``type`` left out."""
  out = []
  for name, spec in run.config.get("evals", {}).items():
    kind = spec.get("type", "")
    if not kind:
      continue
    if kind not in EVALUATORS:
      raise ValueError(f"evals.{name}.type={kind!r} is not an evaluator; known: {sorted(EVALUATORS)} ('' = off)")
    every = int(spec.get("every_steps", 0))
    if every < 0:
      raise ValueError(f"evals.{name}.every_steps must be >= 0, got {every}")
    out.append(Named(name, every, EVALUATORS[kind](run, writer, spec, name)))
  return out


def run_all(run, evaluators, params, step: int, final: bool) -> dict:
  """Runs the evaluators; the merged results (with the step and both samplers' NFE when final)."""
  results = ({"step": step, "generator_nfe": run.generator_nfe, "teacher_nfe": run.teacher.sampler.nfe}
             if final else {})
  for ev in evaluators:
    results.update(ev.run(params, step, final))
  return results


DIGITS_SUMMARY = ("fid", "class_accuracy", "precision", "recall", "near_copies")


def summary(results: dict) -> dict:
  """The few numbers printed at the end of a run or an evaluation."""
  keep = ("tv", "precision", "min_mode_share", "mmd2_ratio")
  out = {}
  for who in ("generator", "teacher"):
    if who in results:
      out[who] = {k: round(results[who][k], 4) for k in keep if k in results[who]}
  if "digits" in results:
    d = results["digits"]
    for who, m in (("generator", d), ("teacher", d.get("teacher"))):
      if m:
        out.setdefault(who, {}).update({f"digits_{k}": round(m[k], 4) for k in DIGITS_SUMMARY if m.get(k) is not None})
  for k in ("fid", "fid_num_samples", "clip_score", "train_seconds", "total_seconds", "steps"):
    if k in results:
      out[k] = round(results[k], 1) if isinstance(results[k], float) else results[k]
  return out

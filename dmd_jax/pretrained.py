"""Frozen networks named by the config: converted folders (``python -m dmd_jax.convert NETWORK``), or a
random-weight stand-in written once under the workdir for ``path='random'`` (the ``:tiny`` configs), through
the same converter a real checkpoint takes. Used by the teachers (teacher, LPIPS) and the evaluators
(Inception, CLIP)."""
from __future__ import annotations

from typing import Callable

import jax

from dmd_jax import distributed, io
from dmd_jax.convert import clip as clip_convert
from dmd_jax.convert import inception as inception_convert
from dmd_jax.convert import lpips as lpips_convert
from dmd_jax.convert.common import write_random_network


def network_dir(path: str, field: str, network: str, workdir: str | None, write_random: Callable[[str], None],
                marker: str = "config.json") -> str:
  """The folder of a converted frozen network. ``path='random'`` asks for a random-weight stand-in, written
  once under ``<workdir>/random_<network>`` by ``write_random(dst)`` (``marker`` is the file written last,
  whose presence means the folder is complete); ``field`` names the config field in errors."""
  if path and path != "random":
    return path
  if not path:
    train_it = " or train one (--mode=teacher_train, configs/digits.py: DIR = that workdir's teacher/)" \
        if network == "edm" else ""
    raise ValueError(f"{field} is empty: convert the network first (python -m dmd_jax.convert {network} "
                     f"--src=... --dst=DIR){train_it} and pass --config.{field}=DIR")
  if workdir is None:
    raise ValueError(f"{field}='random' needs a workdir to write the random-weight network to")
  dst = io.join(workdir, f"random_{network}")
  if not io.exists(io.join(dst, marker)) and jax.process_index() == 0:
    write_random(dst)
  distributed.barrier(f"random {network} written")
  return dst


def lpips(config, workdir: str | None) -> dict:
  """The LPIPS-VGG weights of ``regression.lpips_path`` (docs/method.md §5)."""
  seed = config.seed
  path = network_dir(config.regression.lpips_path, "regression.lpips_path", "lpips", workdir,
                     lambda dst: write_random_network(dst, lpips_convert.trunk_expected_shapes("torchvision"),
                                                      lpips_convert.convert_file, seed))
  return lpips_convert.load_converted_lpips(path)[1]


def inception(path: str, what: str, seed: int, workdir: str | None):
  """``(module, params)`` of the FID Inception at ``path`` (docs/method.md §8; ``what``: the config key that
  named it, for errors; 'random': a seeded random network written under the workdir)."""
  path = network_dir(path, what, "inception", workdir,
                     lambda dst: write_random_network(dst, inception_convert.expected_shapes(),
                                                      inception_convert.convert_file, seed))
  return inception_convert.load_converted_inception(path)


def clip(path: str, what: str, workdir: str | None):
  """``(module, params, tokenizer)`` of the CLIP-score model at ``path`` (docs/method.md §8; ``what``: the
  config key that named it)."""
  # the random stand-in (:tiny) is seeded so that its scores are not all clamped to 0 by max(cos, 0)
  path = network_dir(path, what, "clip", workdir,
                     lambda dst: clip_convert.write_random_converted_clip(dst, seed=3))
  return clip_convert.load_converted_clip(path)

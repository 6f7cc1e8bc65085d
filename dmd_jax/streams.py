"""Named random streams: every random draw of a run comes from ``config.seed`` through one of these.

``key(seed, name)`` is ``fold_in(PRNGKey(seed), id)`` with a fixed id per purpose, so the streams are
independent of each other and a purpose never shifts another's numbers (adding a stream changes nothing
else). Host-side NumPy draws (data orders) use ``numpy_seed(seed, name)`` as a ``np.random.default_rng`` seed
sequence. Inside a stream, item ``i`` (training step, pair, image) takes ``fold_in(stream_key, i)``, so what
it gets does not depend on the device or host count, the chunking, or how many runs built it.
"""
from __future__ import annotations

import jax

STREAMS = {
    "init": 1,                # initial generator / fake-score parameters (random-init teachers: the toy)
    "train": 2,               # the train step: fold_in(key, step) -> noise, timesteps, drawn conditions
    "pairs": 3,               # regression pairs: noise z_i of pair i
    "pair_conditions": 4,     # regression pairs: the class label of pair i
    "regression_order": 5,    # host: the order in which the regression pairs are visited (per epoch)
    "condition_order": 6,     # host: the order of the training prompts (text-to-image)
    "sample_grid": 7,         # the generator / teacher picture at the end of training (same noise for both)
    "fid": 8,                 # FID / COCO evaluation samples of the generator
    "teacher_reference": 9,   # FID reference statistics computed from the teacher's own samples
    "toy_generator": 10,      # toy metrics: generator samples
    "toy_teacher": 11,        # toy metrics: teacher samples
    "real_data": 12,          # host: DMD2's real samples (real-record order; the toy's mixture draws)
    "teacher_init": 13,       # --mode=teacher_train: the teacher's initial weights
    "teacher_train": 14,      # --mode=teacher_train: fold_in(key, step) -> noise levels, noise, dropout
    "teacher_data_order": 15, # host, --mode=teacher_train: the order of the training images (per epoch)
}


def key(seed: int, name: str) -> jax.Array:
  """The root key of stream ``name`` for ``config.seed = seed``."""
  if name not in STREAMS:
    raise KeyError(f"unknown random stream {name!r}; known: {sorted(STREAMS)}")
  return jax.random.fold_in(jax.random.PRNGKey(seed), STREAMS[name])


def numpy_seed(seed: int, name: str) -> tuple[int, int]:
  """A ``np.random.default_rng`` seed sequence for host-side stream ``name``."""
  if name not in STREAMS:
    raise KeyError(f"unknown random stream {name!r}; known: {sorted(STREAMS)}")
  return (int(seed), STREAMS[name])

"""FID Inception-v3 throughput: images/s (total and per device) of ``inception_features`` at 299×299.

    python bench/fid_throughput.py --batch_per_device=64 --num_batches=20
    python bench/fid_throughput.py --batch_per_device=8 --num_batches=3      # a quick CPU run

Times the whole data-parallel path (uint8 upload, TF1 protocol preprocessing, the network at
``precision=HIGHEST``, feature download) over every local device, after one warm-up batch that compiles.
Weights are random unless ``--weights`` names a converted folder (throughput does not depend on them).
Prints a Markdown table row per batch size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmd_jax.evaluation.fid import inception_features  # noqa: E402
from dmd_jax.models.inception import InceptionV3FID  # noqa: E402

PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def random_params(module):
  """Random weights of the right shapes (numpy, so no per-shape compilation); variances kept positive."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 299, 299, 3), jnp.float32))
  rng = np.random.default_rng(0)
  flat = jax.tree_util.tree_flatten_with_path(shapes["params"])
  leaves = []
  for path, s in flat[0]:
    w = 0.05 * rng.standard_normal(s.shape).astype(np.float32)
    leaves.append(np.abs(w) + 1.0 if path[-1].key == "var" else w)
  return jax.tree.unflatten(flat[1], leaves)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_per_device", type=int, nargs="+", default=[64])
  parser.add_argument("--num_batches", type=int, default=10, help="timed batches (after one warm-up)")
  parser.add_argument("--precision", choices=sorted(PRECISIONS), default="highest")
  parser.add_argument("--weights", default=None, help="optional converted Inception folder")
  args = parser.parse_args(argv)

  if args.weights:
    from dmd_jax.convert.inception import load_converted_inception
    module, params = load_converted_inception(args.weights)
  else:
    module = InceptionV3FID()
    params = random_params(module)
  precision = PRECISIONS[args.precision]
  n_dev = jax.device_count()
  kind = jax.devices()[0].device_kind
  rows = []
  for bpd in args.batch_per_device:
    batch = bpd * n_dev
    rng = np.random.default_rng(0)
    warm = rng.integers(0, 256, (batch, 299, 299, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (batch * args.num_batches, 299, 299, 3), dtype=np.uint8)
    inception_features(module, params, warm, batch_size=batch, precision=precision, log_every=0)
    t0 = time.perf_counter()
    feats = inception_features(module, params, images, batch_size=batch, precision=precision, log_every=0)
    dt = time.perf_counter() - t0
    assert feats.shape == (images.shape[0], 2048) and np.all(np.isfinite(feats))
    rate = images.shape[0] / dt
    rows.append((kind, n_dev, bpd, batch, args.precision, rate, rate / n_dev))

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {n_dev} device(s): {kind}; "
        f"{args.num_batches} timed batches of 299x299 uint8 images, TF1 protocol")
  print()
  print("| device kind | devices | batch / device | global batch | precision | images/s "
        "| images/s per device |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for kind, n, bpd, batch, prec, rate, per in rows:
    print(f"| {kind} | {n} | {bpd} | {batch} | {prec} | {rate:.1f} | {per:.1f} |")


if __name__ == "__main__":
  main()

"""Test configuration: tests run on CPU; tests that need several devices run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/helpers.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from helpers import CACHE_ENV  # noqa: E402  (after the path above)

for _k, _v in CACHE_ENV.items():   # before jax is imported: JAX's persistent compilation cache (helpers.py)
  os.environ.setdefault(_k, _v)

# The test files that take longest (seconds of the suite of 2026-11-29 on the 2-core VM: 295 ... 124), run first
# so that `-n 2 --dist loadfile` ends with short files on both workers instead of one long file on one; the
# other files follow in their usual order. xdist's own reordering (by number of tests) is turned off for it.
HEAVY_FIRST = ("test_sdxl_pipeline", "test_sd_pipeline", "test_checkpoint_faults", "test_multihost_images", "test_digits_pipeline", "test_toy_quality",
               "test_edm_pipeline", "test_multihost", "test_dmd2_pipelines", "test_dmd2", "test_gcs_workdir",
               "test_sd_memory_bench", "test_train", "test_lora")


def pytest_configure(config):
  # The slow set: the longest end-to-end runs (the toy default's quality bars, coco:tiny end to end, the image
  # multi-process equalities, the EDM :tiny configs end to end, cifar10:tiny DMD2 end to end, the SDXL :tiny
  # variants, the SDXL exports in diffusers, the damaged-checkpoint and full-disk runs, the workdir's compilation
  # cache). The README test command and CI run it after the rest (`-m "not slow"`, then `-m slow`);
  # docs/status.md "The tests" gives both times.
  config.addinivalue_line("markers", "slow: the longest end-to-end runs, run as a second set (docs/status.md)")
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))

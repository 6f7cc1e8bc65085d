"""The step-indexed data path (``dmd_jax/data/indexed.py``): the epoch order's numbers are pinned (exact resume
and the digits study's results depend on them bit for bit), and a batch's rows are a pure function of the step."""
import numpy as np

from dmd_jax.data.indexed import EpochSampler, StepIndexed, parallel_map


def test_epoch_order_is_pinned():
  s = EpochSampler(7, 3, (5, 11))
  assert [s.indices(i).tolist() for i in range(6)] == [[4, 5, 2], [0, 6, 3], [1, 4, 0], [5, 3, 2], [1, 6, 6],
                                                       [1, 5, 0]]
  s = EpochSampler(1797, 64, 0)     # the digits' 1,797 images, an int seed
  assert s.indices(0)[:8].tolist() == [360, 1773, 1482, 600, 850, 196, 968, 1742]
  assert s.indices(28)[:8].tolist() == [1449, 184, 1528, 975, 607, 92, 501, 39]   # straddles epochs 0 and 1
  assert int(s.indices(1000).sum()) == 58330
  # every epoch a permutation, reshuffled from one epoch to the next
  one = EpochSampler(10, 5, (1, 2))
  order = np.concatenate([one.indices(i) for i in range(4)])
  assert sorted(order[:10]) == sorted(order[10:]) == list(range(10)) and not np.array_equal(order[:10], order[10:])


def test_step_indexed_rows_are_a_function_of_the_step():
  table = np.arange(50) * 10
  reads = []

  def read(idx):
    reads.append(np.asarray(idx).tolist())
    return {"v": table[idx]}

  ds = StepIndexed(50, (3,), read)
  full = ds.batch(7, 8)["v"]
  np.testing.assert_array_equal(full, table[EpochSampler(50, 8, (3,)).indices(7)])
  halves = [StepIndexed(50, (3,), read).batch(7, 8, r)["v"] for r in (slice(0, 4), slice(4, 8))]
  np.testing.assert_array_equal(np.concatenate(halves), full)   # two processes' rows = one process's batch
  assert [len(r) for r in reads[-2:]] == [4, 4]                  # each read only its rows
  assert len(ds) == 50 and ds.indices(7, 8).dtype == np.int64


def test_parallel_map_keeps_order():
  assert parallel_map(lambda x: x * x, range(100)) == [x * x for x in range(100)]

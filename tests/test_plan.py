"""Compile-only memory plans (``python -m dmd_jax.plan`` / ``--mode=plan``, docs/benchmarks.md): product names
translate to the compiler's TPU topologies; a tiny image config's step compiles for a v5e slice on this CPU
(libtpu, no TPU) with real per-device figures; the batch search; clear errors. And activation sharding
(``sharding.constrain_batch``): under FSDP on 8 and 32 emulated devices a mid-size SD UNet's training
forward / backward does the 1-device program's flops per device (the partitioner splits no heads or channels)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, env_with_devices, run_main

from dmd_jax import plan

CIFAR_TINY = os.path.join(ROOT, "configs", "cifar10.py") + ":tiny"


@pytest.mark.parametrize("name,target,devices_kw,hbm", [
    ("v5litepod-32", "v5e:4x8", (), 16),
    ("v5e-8", "v5e:2x4", (), 16),
    ("v5litepod-1", "v5e:1x1", (("chips_per_host_bounds", (1, 1, 1)),), 16),
    ("v6e-16", "v6e:4x4", (), 32),
    ("v5p-64", "v5p:2x4x4", (), 95),
    ("v5p-8", "v5p:2x2x1", (), 95),
    ("v4-32", "v4:2x2x4", (("chip_config_name", "megacore"),), 32),
    ("v5e:2x4", "v5e:2x4", (), 16),
    ("tpu7x:2x2x1", "tpu7x:2x2x1", (), 96),
])
def test_topology_names(name, target, devices_kw, hbm):
  t = plan.parse_topology(name)
  assert (t.target, t.kwargs, t.hbm_bytes) == (target, devices_kw, hbm * 2 ** 30)


@pytest.mark.parametrize("name,match", [
    ("v5litepod-3", r"v5litepod-N counts chips; N must be one of 1, 4, 8, 16"),
    ("v5p-6", r"v5p-N counts TensorCores \(2 per chip\); N must be one of 8, 16, 32"),
    ("v9-8", r"unknown topology 'v9-8'"),
    ("v5e", r"unknown topology 'v5e'"),
])
def test_topology_errors(name, match):
  with pytest.raises(ValueError, match=match):
    plan.parse_topology(name)


def test_batch_search():
  """Doubling then bisection finds the largest fitting batch; None when batch 1 does not fit."""
  probed = []

  def probe(limit):
    def f(b):
      probed.append(b)
      return [{"fits": b <= limit}, {"fits": True}]
    return f

  for limit, want in ((1, 1), (5, 5), (12, 12), (64, 64), (100, 100), (5000, 4096)):
    probed.clear()
    best, rows = plan.search_batch(probe(limit), max_batch=4096)
    assert best == want and len(rows) == 2 * len(probed) == 2 * len(set(probed))
  probed.clear()
  assert plan.search_batch(probe(0))[0] is None and probed == [1]


def test_plan_mode_compiles_for_a_v5e_slice(tmp_path):
  """``--mode=plan`` on cifar10:tiny for a 4-chip v5e slice: libtpu's compile of the fake-score step, the
  devices and their memory the TPU's, the batch the config's global batch over the chips."""
  out = tmp_path / "plan.json"
  p = run_main("--mode=plan", "--topology=v5litepod-4", "--steps=fake", f"--output={out}", config=CIFAR_TINY,
               timeout=600)
  assert "| fake | v5litepod-4 (v5e:2x2) | 4 (4 × 1) | 2 + 2 |" in p.stdout, p.stdout
  rows = json.loads(out.read_text())["rows"]
  (row,) = rows
  assert row["device_kind"] == "TPU v5 lite" and row["devices"] == 4 and row["hbm_bytes"] == 16 * 2 ** 30
  m = row["memory"]
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
  # the fake-score state (parameters + two Adam moments) is donated and updated in place: all of the output but
  # the metrics is aliased to the arguments
  assert 0.99 * m["output"] < m["alias"] <= m["output"] and m["temp"] > 0 and row["fits"] is True
  assert row["flops"] > 0 and row["batch_per_device"] == 2 and row["regression_per_device"] == 2


def test_a_program_the_compiler_refuses_is_a_row_that_does_not_fit():
  """libtpu refuses a program whose temporaries exceed the chip's HBM (RESOURCE_EXHAUSTED): the row says so, with
  the temporaries the compiler asked for (the toy at 2^25 samples per chip: ~110 GiB)."""
  p = run_main("--mode=plan", "--topology=v5litepod-1", "--batch_per_device=33554432", timeout=300)
  line = next(l for l in p.stdout.splitlines() if l.startswith("| train |"))
  assert "**no** (compiler: out of memory)" in line, p.stdout
  temp_mib = float(line.split("|")[8].replace(",", ""))
  assert 50 * 1024 < temp_mib < 500 * 1024, line


def test_plan_errors():
  p = run_main("--mode=plan", "--topology=v5litepod-3", check=False, timeout=120)
  assert p.returncode == 2 and "v5litepod-N counts chips" in p.stderr
  p = run_main("--mode=plan", "--topology=v5litepod-4", "--config.batch_size=10", check=False, timeout=300)
  assert p.returncode == 2 and "batch_size=10 does not divide over the 4 devices" in p.stderr, p.stderr[-2000:]
  p = run_main("--mode=plan", "--topology=v5litepod-4", "--batch_per_device=many", check=False, timeout=300)
  assert p.returncode == 2 and "--batch_per_device must be an integer or 'auto'" in p.stderr


FLOPS_SCRIPT = r"""
import json, jax, jax.numpy as jnp
from dmd_jax import sharding
from dmd_jax.families.sd import convert as sdc
# SD 1.5's UNet structure at a small size: cross-attention and plain levels, 8 heads, 32 groups, bf16
MID = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[64, 128], layers_per_block=1,
           down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
           cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
module, inputs = sdc.build_unet(MID, dtype=jnp.bfloat16)
params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))["params"]
loss = lambda p, x, t, c: jnp.mean(module.apply({"params": p}, x, t, c).astype(jnp.float32) ** 2)
out = {}
for n in (1, 8, 32):
  mesh = sharding.make_mesh(1, n, devices=jax.devices()[:n])     # FSDP over n devices, batch 1 per device
  psh, bsh = sharding.tree_sharding(mesh, params, 2 ** 10), sharding.batch_sharding(mesh)
  f = jax.jit(jax.value_and_grad(loss), in_shardings=(psh, bsh, bsh, bsh),
              out_shardings=(sharding.replicated(mesh), psh))
  args = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, psh),
          jax.ShapeDtypeStruct((n, 16, 16, 4), jnp.float32, sharding=bsh),
          jax.ShapeDtypeStruct((n,), jnp.float32, sharding=bsh),
          jax.ShapeDtypeStruct((n, 77, 64), jnp.float32, sharding=bsh))
  with jax.set_mesh(mesh):
    lowered = f.lower(*args)
  out[n] = {"flops": lowered.compile().cost_analysis()["flops"],
            "constraints": lowered.as_text().count("sharding_constraint")}
print(json.dumps(out))
"""


def test_activation_sharding_keeps_flops_per_device():
  p = subprocess.run([sys.executable, "-c", FLOPS_SCRIPT], cwd=ROOT, env=env_with_devices(32, fast_compile=True),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  one = r["1"]["flops"]
  for n in ("8", "32"):
    assert abs(r[n]["flops"] / one - 1) < 0.10, r
    assert r[n]["constraints"] > 20, r     # the block boundaries are constrained under a multi-device mesh
  assert r["1"]["constraints"] == 0        # and nothing is added on one device

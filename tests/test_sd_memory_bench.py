"""``bench/sd_memory.py --tiny``: the compile-only memory table of the SD generator / fake-score steps on emulated
meshes (the full-size table's code path on the tiny random SD shapes), and the LoRA generator step's saving."""
import json
import os
import subprocess
import sys

from helpers import ROOT, env_with_devices


def _bench(out, *args):
  env = env_with_devices(2)
  # Compile time only (XLA:CPU's fusion emitters are slow to compile; the buffer sizes move by < 1%).
  env["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
  # --min_shard_size 4096: the tiny UNet's kernels are FSDP-sharded too (by default only LPIPS's VGG16 is).
  p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sd_memory.py"), "--tiny", *args,
                      "--min_shard_size", "4096", "--fast_compile", "--json", str(out)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, f"STDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}"
  return p


def test_sd_memory_bench_tiny(tmp_path):
  out = tmp_path / "rows.json"
  p = _bench(out, "--meshes", "1", "2", "--batch_per_device", "1", "2")
  table = [line for line in p.stdout.splitlines() if line.startswith(("| generator step |", "| fake-score step |"))]
  rows = json.loads(out.read_text())["rows"]
  assert len(rows) == len(table) == 8      # 2 meshes × 2 batches × 2 steps, fsdp layout
  assert {r["step"] for r in rows} == {"generator step", "fake-score step"}

  def row(step, n, b):
    [r] = [r for r in rows if r["step"] == step + " step" and r["devices"] == n and r["batch_per_device"] == b]
    return r

  total = lambda r: r["memory"]["argument"] + r["memory"]["output"] - r["memory"]["alias"] + r["memory"]["temp"]
  for r in rows:
    assert r["layout"] == "fsdp" and (r["data"], r["fsdp"]) == (1, r["devices"])
    assert r["global_batch"] == r["batch_per_device"] * r["devices"]
    assert r["regression_per_device"] == 1                    # ceil(b / 2) for b = 1, 2
    assert total(r) > 0 and r["memory"]["temp"] > 0 and r["compile_s"] > 0
    assert r["memory"]["alias"] > 0                           # the donated state is updated in place
  for step in ("generator", "fake-score"):
    for b in (1, 2):
      # weights, Adam moments and the frozen teacher split over 2 devices (the VAE and LPIPS stay replicated:
      # sharding.frozen_sharding; at the tiny size LPIPS's VGG16 is most of the generator step's arguments)
      shrink = 0.75 if step == "fake-score" else 1.0
      assert row(step, 2, b)["memory"]["argument"] < shrink * row(step, 1, b)["memory"]["argument"]
      assert total(row(step, 2, b)) < total(row(step, 1, b))
    for n in (1, 2):
      lo, hi = row(step, n, 1), row(step, n, 2)
      assert hi["memory"]["argument"] > lo["memory"]["argument"]  # more latents / embeddings per device
      assert total(hi) > total(lo)
      assert hi["flops"] > lo["flops"]

  # LoRA (docs/lora.md): each step without its network's copy of the UNet and that copy's Adam moments
  # (coco.py:tiny,lora's rank 4; the fake score too with model.lora.fake_score) is below the full fine-tune's
  # by more than one float32 copy of the UNet
  _bench(tmp_path / "lora.json", "--meshes", "1", "--batch_per_device", "1", "--lora", "4", "--lora_fake")
  lora_rows = json.loads((tmp_path / "lora.json").read_text())["rows"]
  assert [r["step"] for r in lora_rows] == ["generator step (LoRA r4)", "fake-score step (LoRA r4)"]
  for low, step in zip(lora_rows, ("generator", "fake-score")):
    full = row(step, 1, 1)
    assert low["trainable_params"] == 43_072
    unet_bytes = 4 * full["trainable_params"]
    saved = total(full) - total(low)
    print(f"\n{step} step: full {total(full) / 2**20:.2f} MiB, LoRA r4 {total(low) / 2**20:.2f} MiB, saved "
          f"{saved / 2**20:.2f} MiB = {saved / unet_bytes:.2f} float32 UNet copies")
    assert saved > unet_bytes

#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one go (a single-GPU machine without internet access).
#   bash bench/gpu_run.sh OUTDIR [WHEELDIR]
# WHEELDIR: wheels of what the machine lacks (diffusers, ml_collections, clu, tensorboardX, ...), installed
# with --no-deps into /tmp/site. Each benchmark has its own time limit so one slow compile does not take the
# others down (SD_SIZE, FID_BATCH, EDM_CONFIG, EDM_BATCH, EDM_STEPS and *_TIMEOUT shrink it for a CPU dry run); tables land in OUTDIR/*.md, logs in OUTDIR/*.log.
# Attention kernels ('auto' | 'xla' | 'cudnn', the networks' attention argument): SD_ATTENTION (one train row each),
# EDM_ATTENTION (model.attention).
set -u
out=${1:?usage: bench/gpu_run.sh OUTDIR [WHEELDIR]}
mkdir -p "$out"
if [ -n "${2:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$2"/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in bench/sd_speed.py: let JAX grow its pool instead of taking 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$out/env.log"
timeout ${SD_TIMEOUT:-330} python3 bench/sd_speed.py --size=${SD_SIZE:-full} --batch ${SD_BATCH:-4} --train_batch 8 --repeats 5 \
  --attention ${SD_ATTENTION:-auto xla} \
  --out "$out/sd_speed_full.md" > "$out/sd_speed_full.log" 2>&1; echo "sd_speed rc=$?"
timeout ${FID_TIMEOUT:-60} python3 bench/fid_throughput.py --batch_per_device ${FID_BATCH:-250} --num_batches 4 \
  > "$out/fid_throughput.md" 2> "$out/fid_throughput.log"; echo "fid_throughput rc=$?"
timeout ${EDM_TIMEOUT:-150} python3 bench/edm_step.py --config=${EDM_CONFIG:-imagenet64} --batch_per_device=${EDM_BATCH:-32} --dtype=bfloat16 \
  --attention=${EDM_ATTENTION:-auto} --steps=${EDM_STEPS:-full} --repeats=5 --workdir=/tmp/edm_bench --out "$out/edm_step.md" \
  > "$out/edm_step.log" 2>&1; echo "edm_step rc=$?"
for f in "$out"/*.md; do echo "== $f"; cat "$f"; done

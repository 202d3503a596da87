#!/usr/bin/env bash
# On the lent GPU machine (see README "Performance"): two `gpu_demo` rounds of the Ray system on one
# GPU shared by the pools and the learner, with GPU utilisation sampled every 0.5 s alongside.
# Carry .gpu-bundle (bash ../shared/tools/gpu-bundle.sh) and .gpu-cache (tiny model's tokenizer + HH data).
set -u
out=${OUT:-/tmp/apo-gpu}; mkdir -p "$out"
bash .gpu-bundle/install.sh
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled TORCH_CUDA_ARCH_LIST=9.0 RAY_USAGE_STATS_ENABLED=0 \
       APO_RAY_CACHE=$PWD/.gpu-cache PYTHONUNBUFFERED=1
python -c "from apo_ray.models.loading import resolve_model; resolve_model('smollm2-135m-random')"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$out/gpu_util.csv" &
smi=$!
start=$(date +%s)
python jobs/apo.py experiment=gpu_demo run.output_dir="$out/gpu_demo" data.path="$PWD/.gpu-cache/hh-rlhf" "$@" \
    > "$out/gpu_demo.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s"
kill $smi
grep -E "apo_ray.(progress|game)|Error|error" "$out/gpu_demo.log" | grep -v "Loading" | tail -40
python - "$out" <<'PY'
import csv, json, sys
rows = [r for r in csv.reader(open(f"{sys.argv[1]}/gpu_util.csv")) if len(r) == 3]
util = [float(r[1]) for r in rows]
print(f"GPU samples {len(util)}, idle (0%) share {sum(u == 0 for u in util) / max(len(util), 1):.2f}, "
      f"mean util {sum(util) / max(len(util), 1):.1f}%, peak memory {max(float(r[2]) for r in rows):.0f} MiB")
PY

#!/usr/bin/env bash
# The device check of issue 17, in one go (< 8 minutes on an H100), for a machine with a GPU and a
# CUDA build of torch:
#   1. tests/test_cuda.py (GPU = CPU hypergradients, chunked = per-task, amp, compile, memory meter);
#   2. tests of the sync budget and the batched default on CUDA (tests/test_engine.py -k cuda if present);
#   3. benchmarks/engine.py: per-task vs chunk 8/32 at B = 32, default and gd forms, Conv-4 on
#      CIFAR-FS-shaped data and ResNet-12 at 84 x 84: s/iter, peak allocator MiB, host syncs and the
#      synchronising calls `torch.cuda.set_sync_debug_mode("warn")` reports; amp bf16.
# Results go to ${OUT:-benchmarks/results/gpu_check}; the log to $OUT/gpu_check.log. From the repo root:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  timeout 150 python -m pytest tests/test_cuda.py -p no:cacheprovider -q -rs -x; echo "test_cuda rc=$?"
  [ -f tests/test_engine.py ] && { timeout 60 python -m pytest tests/test_engine.py -p no:cacheprovider -q -rs; echo "test_engine rc=$?"; }
  timeout 120 python benchmarks/engine.py --device cuda --meta-batch 32 --chunks 1,8,32 --forms default,gd \
      --models conv4 --amp bf16 --repeats 3 --out "$OUT"; echo "engine conv4 rc=$?"
  cp "$OUT/engine_cuda.json" "$OUT/engine_cuda_conv4.json" 2>/dev/null
  timeout 150 python benchmarks/engine.py --device cuda --meta-batch 32 --chunks 1,8,32 --forms default,gd \
      --models resnet12 --amp bf16 --repeats 2 --out "$OUT"; echo "engine resnet12 rc=$?"
  cp "$OUT/engine_cuda.json" "$OUT/engine_cuda_resnet12.json" 2>/dev/null
  date -u
} 2>&1 | tee "$OUT/gpu_check.log"

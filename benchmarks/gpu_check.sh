#!/usr/bin/env bash
# The CUDA checks of issues 4 and 6 in one go, for a machine with a GPU and a CUDA build of torch:
#   1. tests/test_cuda.py (GPU = CPU hypergradients, chunked = per-task, amp, compile, memory meter);
#   2. benchmarks/speed.py --device cuda (target: chunk 32 at least 3x faster than the per-task loop);
#   3. mrml bench memory on CUDA in the paper's setting (meta-batch 32, K = 1, 20, 100).
# Results go to ${OUT:-benchmarks/results}; the log to $OUT/gpu_check.log. Runs from the repo root:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  python -m pytest tests/test_cuda.py -p no:cacheprovider -q -rs; echo "test_cuda rc=$?"
  python benchmarks/speed.py --device cuda --out "$OUT/speed_cuda.json"; echo "speed rc=$?"
  python -m mrml bench memory --device cuda --meta-batch 32 --steps 1,20,100 --repeats 3 \
      --algos mrml,maml,anil,itd-bio --skip maml:100 \
      --json "$OUT/memory_cuda.json" --plot "$OUT/memory_cuda.png"; echo "memory rc=$?"
} 2>&1 | tee "$OUT/gpu_check.log"

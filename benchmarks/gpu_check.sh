#!/usr/bin/env bash
# The GPU checks in one prepared run (for a machine with a CUDA device and Triton installed):
# the CUDA tests, then the GPU benchmark, which writes docs/benchmarks_gpu.md and its chart.
#     bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')" || exit 2
status=0
python -m pytest -q -p no:cacheprovider tests/test_cuda.py || status=1
python benchmarks/bench_core.py --device cuda --write-docs || status=1
exit $status

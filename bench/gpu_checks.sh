#!/usr/bin/env bash
# The GPU measurements issue 4's sampling target needs, in one short run (a few minutes on one GPU):
# MaskGIT (8 steps) vs KV-cached AR decoding in fp32 and in bf16, batch 1 / 8 / 32, with one profiled call
# per batch size (operators, kernels, kernel time). Writes JSON to ${OUT:-bench/results}.
#   bash bench/gpu_checks.sh            # on a machine with CUDA and this repository's dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" bench/sampling.py --device cuda --batch 1 8 32 --repeats 5 --profile --out "$out/sampling_gpu_fp32.json"
"$py" bench/sampling.py --device cuda --batch 1 8 32 --repeats 5 --profile --dtype bfloat16 --out "$out/sampling_gpu_bf16.json"

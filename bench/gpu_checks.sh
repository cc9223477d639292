#!/usr/bin/env bash
# The GPU measurements owed in docs/BENCHMARKS.md. First issue 4's sampling target (a few minutes on one GPU):
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

# Then issue 18's quality rows at 14 and 16 bits (run apart with SKIP_VQ=1 first if one call's 10 minutes is short), every configuration of bench/sweeps/large_vocab.jsonl over 3 seeds
# (48 runs; seconds each on one GPU, a dozen at once). Needs CIFAR-10: bench/vq_quality.py reads
# $VQTRAIN_CIFAR_TAR, else ../shared/data/cifar10/train.tar (74 MiB: carry it in two halves), and
# vector-quantize-pytorch (the `bench` extra). Skipped with SKIP_VQ=1.
if [ "${SKIP_VQ:-0}" != 1 ]; then
  for bits in 14 16; do
    "$py" bench/vq_quality_sweep.py --jobs bench/sweeps/large_vocab.jsonl --bits "$bits" --seeds 0,1,2 \
      --device cuda --workers 12 --out "$out/vq_quality_${bits}bit_gpu.jsonl"
  done
fi

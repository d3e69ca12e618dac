#!/usr/bin/env bash
# One-shot run on a lent GPU: torch-version compatibility tests, then the training-step benchmark.
# Each result lands in $OUT as soon as it exists, so a run cut short still returns what it measured.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-suite}
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } \
  | tee "$OUT/device.txt"
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_models.py tests/test_sra.py tests/test_repa.py \
  tests/test_config.py tests/test_train.py tests/test_dts.py tests/test_dts_release.py -k "not two_processes" 2>&1 \
  | tail -4 | tee "$OUT/pytest.txt"
bench() {  # limit_s, then bench_train_step.py arguments
  local limit=$1; shift
  timeout "$limit" python3 bench/bench_train_step.py --batch-size 32 --precision bf16 --warmup 5 --steps 20 \
    --out "$OUT/train_step.jsonl" "$@" 2>&1 | grep -v Warning | tee -a "$OUT/train_step.txt"
}
bench 60 --model SiT-B/2 --variants none sra repa --memory
bench 80 --model SiT-B/2 --precision fp16 --variants sra sra-dts-as sra-dts-as-dense --memory
bench 90 --model MMDiT-D24/2 --variants none sra sra-full --memory  # text to image (needs transformers only for data)
timeout 40 python3 bench/bench_attention_mask.py --model SiT-B/2 --batch-size 32 --dtype fp16 2>&1 \
  | grep -v Warning | tee "$OUT/attention_mask.txt"
bench 150 --model SiT-XL/2 --memory
bench 120 --model SiT-XL/2 --compile --variants none sra
bench 70 --model SiT-B/2 --compile --variants none sra

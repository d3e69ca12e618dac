#!/usr/bin/env bash
# The GPU measurements, in parts that each fit one 10-minute device call on an H100/H200 (the limits below
# add up to under 540 s per part; a session's 15 device minutes run about two parts):
#
#   bash bench/gpu_suite.sh fp8      # tests under the GPU's torch; FP8 teacher features with the real kernels;
#                                    #   SRA / baseline step with the bf16 and the FP8 teacher, eager and compiled
#   bash bench/gpu_suite.sh mfu      # the baseline's MFU against the per-GPU batch, eager and compiled, and
#                                    #   the other compile modes (CUDA graphs, max-autotune, channels-last)
#   bash bench/gpu_suite.sh sample   # sampling throughput against the release's settings, 50K extrapolated
#   bash bench/gpu_suite.sh other    # MMDiT-D24/2 step, the token-group variants, the attention mask
#   SMOKE=1 bash bench/gpu_suite.sh fp8   # every command at toy size on the CPU: catches flag errors first
#
# Each result lands in $OUT as soon as it exists (one .txt per bench and the JSON lines), so a call cut
# short still returns what it measured. Wheels of packages the GPU image lacks (diffusers for --decode)
# are installed from $WHEELS when that folder exists.
set -u
export PYTHONUNBUFFERED=1
PART=${1:-fp8}
OUT=${OUT:-/tmp/gpu-suite}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then python3 -m pip install -q --no-deps --no-index "$WHEELS"/*.whl; fi

if [ -n "${SMOKE:-}" ]; then  # toy sizes: the same commands, seconds each on a CPU
  XL=SiT-S/2; B=SiT-S/2; MM=MMDiT-D6/2; SIDE=(--input-size 8); BATCH=2; SWEEP=(2 4); STEPS=(--warmup 2 --steps 2 --rounds 1)
  SAMPLING=(--model SiT-S/2 --input-size 8 --batch-size 2 --steps 4 --num-batches 1 --device cpu)
else
  XL=SiT-XL/2; B=SiT-B/2; MM=MMDiT-D24/2; SIDE=(); BATCH=32; SWEEP=(32 64 128 256); STEPS=(--warmup 5 --steps 20)
  SAMPLING=(--model SiT-XL/2 --batch-size 256 --steps 250 --num-batches 1 --device cuda --bf16)
fi
log() { grep -v Warning | tee -a "$OUT/$1"; }
limited() {  # limit_s, then the command (toy runs get 300 s whatever their GPU limit)
  local limit=$1; shift
  timeout "$([ -n "${SMOKE:-}" ] && echo 300 || echo "$limit")" "$@"
}
bench() {  # limit_s, log name, then bench_train_step.py arguments
  local limit=$1 name=$2; shift 2
  limited "$limit" python3 bench/bench_train_step.py --batch-size "$BATCH" --precision bf16 "${STEPS[@]}" \
    "${SIDE[@]}" --out "$OUT/train_step.jsonl" "$@" 2>&1 | log "$name.txt"
}

{ nvidia-smi -L 2>/dev/null; python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } \
  | tee "$OUT/device.txt"

case "$PART" in
fp8)
  if [ -z "${SMOKE:-}" ]; then  # CI runs the suite on the CPU already
    limited 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_models.py tests/test_sra.py \
      tests/test_flops.py tests/test_teacher_precision.py tests/test_config.py 2>&1 | tail -4 | tee "$OUT/pytest.txt"
  fi
  # what FP8 does to the teacher's target, with the real kernels
  limited 60 python3 bench/check_teacher_precision.py --model "$XL" "${SIDE[@]}" --batch-size 8 \
    --out "$OUT/teacher_precision.jsonl" 2>&1 | log teacher_precision.txt
  # SRA / baseline with the bf16 and the FP8 teacher, eager (with memory) and compiled
  bench 130 sra_fp8 --model "$XL" --variants none sra sra-fp8 --memory
  bench 240 sra_fp8_compiled --model "$XL" --compile --variants none sra sra-fp8
  ;;
mfu)
  bench 120 mfu_eager --model "$XL" --variants none --batch-sizes "${SWEEP[@]}"
  bench 200 mfu_compiled --model "$XL" --compile --variants none --batch-sizes "${SWEEP[@]}"
  bench 100 mfu_modes --model "$XL" --compile-mode max-autotune-no-cudagraphs --variants none --channels-last
  bench 100 mfu_modes --model "$XL" --compile-mode reduce-overhead --variants none
  ;;
sample)
  # this project's sampler (bf16, SDPA, no unconditional pass outside the interval) against the release's
  # settings (fp32, explicit attention, both halves every step), 50K extrapolated, decoding included
  limited 500 python3 bench/bench_sampling.py "${SAMPLING[@]}" --variants ours release --decode \
    --out "$OUT/sampling.jsonl" 2>&1 | log sampling.txt
  ;;
other)
  bench 150 mmdit --model "$MM" --variants none sra sra-full --memory
  bench 90 dts --model "$B" --precision fp16 --variants sra sra-dts-as sra-dts-as-dense --memory
  limited 40 python3 bench/bench_attention_mask.py --model "$B" "${SIDE[@]}" --batch-size "$BATCH" --dtype fp16 \
    2>&1 | log attention_mask.txt
  ;;
*)
  echo "usage: bash bench/gpu_suite.sh fp8|mfu|sample|other" >&2
  exit 2
  ;;
esac

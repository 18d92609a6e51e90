#!/usr/bin/env bash
# Every GPU figure of the README in one call, tables under $OUT (a folder per phase).
#
#   tests/gpu/measure.sh PHASE...     PHASE: smoke, kernel, sweep, tiles, decode, prefill, long, workload, exactness,
#                                     invariance, grid, grid-alone, grid-profile, prefill-kernels, grid-step, agnostic (or all)
#
# Runs on a CUDA machine where `python3` has torch; packages it lacks come as wheels in .whl/
# (click, tqdm, tabulate, rouge, pytest and its needs, and the transformers kvbench is tested with),
# the LongBench mini set and a tokenizer in .dev-assets/ (the tokenizer only builds prompts of the
# right lengths for the random-weight model). Random weights of Llama-3-8B's shape, bf16, sdpa.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/kvbench  # the repository root is the package
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
MINI=.dev-assets/longbench-mini
TOKENIZER=.dev-assets/tokenizer
phases=("$@")
[[ " ${phases[*]} " == *" all "* ]] && phases=(smoke kernel decode prefill long workload exactness invariance grid grid-alone prefill-kernels grid-step agnostic)

offline_prefixkv_profile() {  # an offline PrefixKV profile for the random model (uniform per-layer ratios)
  python3 - <<'PY'
from kvbench.methods.prefixkv import write_config
write_config({"model": "llama3-8b-random", "num_layers": 32, "ratio": 0.97, "layer_ratios": [0.97] * 32,
              "samples": 0}, "/tmp/prefixkv-profile.json")
PY
}

for phase in "${phases[@]}"; do
  mkdir -p "$OUT/$phase"
  case $phase in
  smoke)  # versions, the CUDA tests (graphs equal eager, the kernels against PyTorch, batch invariance)
    python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
    python3 -m pytest -q -p no:cacheprovider tests/test_decode.py tests/test_attention_mass.py tests/test_batch_invariant.py tests/test_elastic.py tests/test_windowkv.py tests/test_elementwise.py \
      -k "cuda or triton" -rs 2>&1 | tee "$OUT/smoke/tests.txt"
    ;;
  kernel)  # the fused attention-mass kernel against the chunked PyTorch path and causal SDPA
    python3 tests/gpu/attention_mass.py 2>&1 | tee "$OUT/kernel/attention_mass.txt"
    ;;
  tiles)  # the batch-invariant linear kernel's tiles by row count (speed, same bits), the decode step's kernels
    python3 tests/gpu/linear_tiles.py --out "$OUT/tiles" 2>&1 | tee "$OUT/tiles/log.txt"
    ;;
  sweep)  # tile configurations of the kernel at 32k tokens
    python3 tests/gpu/attention_mass.py --sweep 2>&1 | tee "$OUT/sweep/attention_mass.txt"
    ;;
  decode)  # the decode step by batch size, CUDA graph and eager
    python3 -m kvbench bench --workload decode --model llama3-8b --batch-sizes 1,8,32 --cache-tokens 576 \
      --steps 40 --repeats 3 --out "$OUT/decode"
    ;;
  prefill)  # prefill time and peak memory by method at 16k and 32k
    offline_prefixkv_profile
    python3 -m kvbench bench --model llama3-8b --lengths 16384,32768 --capacity 512 --new-tokens 16 --repeats 2 \
      --methods fullkv,snapkv,h2o,elastic,prefixkv:prefix_config=/tmp/prefixkv-profile.json,prefixkv:prefix_config=online \
      --out "$OUT/prefill"
    ;;
  long)  # 64k and 128k tokens: prefill time and the peak memory that decides which card a prompt fits
    python3 -m kvbench bench --model llama3-8b --lengths 65536,131072 --capacity 512 --new-tokens 8 --repeats 1 \
      --methods fullkv,snapkv,h2o --out "$OUT/long"
    ;;
  workload)  # the run loop's engine over the mini set: batch 1 against batched, full cache and SnapKV-512
    python3 -m kvbench bench --workload longbench --model llama3-8b --tokenizer "$TOKENIZER" --data-dir "$MINI" \
      --methods snapkv,fullkv --capacity 512 --batch-size 32 --alone-limit 1 --alone-eager --max-length 7950 \
      --out "$OUT/workload"
    ;;
  exactness)  # the same in fp32 on one sample per task: do batched tokens equal batch-1 tokens without bf16 rounding?
    # (the plain kernels: the question is whether their batch-dependent rounding is what moves tokens)
    python3 -m kvbench bench --workload longbench --model llama3-8b --dtype fp32 --no-batch-invariant --tokenizer "$TOKENIZER" \
      --data-dir "$MINI" --methods snapkv --capacity 512 --batch-size 32 --limit 1 --alone-limit 1 --max-length 7950 \
      --out "$OUT/exactness"
    ;;
  invariance)  # batch-invariant decoding against the plain kernels: step cost, samples/h, batched = alone, repeatable
    python3 tests/gpu/invariance.py --data-dir "$MINI" --tokenizer "$TOKENIZER" --limit 2 --out "$OUT/invariance" \
      2>&1 | tee "$OUT/invariance/log.txt"
    ;;
  grid)  # the papers' LongBench table (29 configurations) sharing each prefill, beside one by one on a sample a task;
          # decode batch auto; peak memory in the total row (WindowKV with --task-type qa: no classifier needed for speed).
          # GRID_LIMIT=K: the first K samples of each task only (the projection weighs each task by its own cost);
          # GRID_ALONE=0: not one by one (the grid's figures only)
    offline_prefixkv_profile
    python3 -m kvbench bench --workload longbench --grid --model llama3-8b --tokenizer "$TOKENIZER" --data-dir "$MINI" \
      ${GRID_LIMIT:+--limit "$GRID_LIMIT"} \
      --methods fullkv,streamingllm,h2o,snapkv,pyramidkv,windowkv:task_type=qa,prefixkv:prefix_config=/tmp/prefixkv-profile.json,elastic \
      --capacity 128,256,512,1024 --batch-size auto --alone-limit "${GRID_ALONE:-1}" --max-length 7950 --out "$OUT/grid"
    ;;
  grid-alone)  # snapkv-512 alone at batch auto (decode tokens/s at the batch auto picks), and prefill MFU at 6.5k and 32k
    python3 -m kvbench bench --workload longbench --grid --model llama3-8b --tokenizer "$TOKENIZER" --data-dir "$MINI" \
      --methods snapkv --capacity 512 --batch-size auto --alone-limit 1 --max-length 7950 --out "$OUT/grid-alone/snapkv-512"
    python3 -m kvbench bench --model llama3-8b --lengths 6554,32768 --methods fullkv,snapkv --capacity 512 \
      --new-tokens 4 --repeats 3 --out "$OUT/grid-alone/prefill"
    ;;
  grid-profile)  # where the 29-configuration grid's shared prefill spends its time: the forward pass, each method's
                  # selections, its eviction schedules (GRID_LIMIT samples a task, default 1)
    offline_prefixkv_profile
    python3 tests/gpu/grid_profile.py --data-dir "$MINI" --tokenizer "$TOKENIZER" --limit "${GRID_LIMIT:-1}" \
      --methods fullkv,streamingllm,h2o,snapkv,pyramidkv,windowkv:task_type=qa,prefixkv:prefix_config=/tmp/prefixkv-profile.json,elastic \
      --out "$OUT/grid-profile" 2>&1 | tee "$OUT/grid-profile/log.txt"
    ;;
  prefill-kernels)  # the prefill's kernels by device time at 6.5k and 32k tokens, and kvbench's RMSNorm, rotary and
                    # SiLU-gate kernels against the model's (alternated, medians)
    python3 tests/gpu/prefill_kernels.py --lengths 6554,32768 --out "$OUT/prefill-kernels" 2>&1 \
      | tee "$OUT/prefill-kernels/log.txt"
    ;;
  grid-step)  # a grid-shaped decode step (275 rows of 600 cached tokens, 11 of 7,000, all evicting) on 512 and on
               # 320 rows, as CUDA graphs, and its kernels by device time
    python3 tests/gpu/grid_step.py --out "$OUT/grid-step" 2>&1 | tee "$OUT/grid-step/log.txt"
    ;;
  agnostic)  # the question-agnostic prefill (context prefill + extend) against the question-aware one at 32k
    python3 tests/gpu/question_agnostic.py --lengths 32768 --question-tokens 64 --capacity 512 --repeats 5 \
      --methods fullkv,snapkv,pyramidkv,streamingllm --out "$OUT/agnostic" 2>&1 | tee "$OUT/agnostic/log.txt"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done

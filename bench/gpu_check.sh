#!/usr/bin/env bash
# The single prepared GPU script: GPU tests, headline benchmarks against every
# baseline present, copy bandwidth, all into $OUT, in under 8 minutes. Run from the repository root on
# the lent machine (see bench/README.md, "GPU"):
#
#   here, once:  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                    --implementation cp -d .whl liger-kernel==0.8.5        # pure-Python wheel
#   device tool: run(command="BENCH_GIT_SHA=<git rev-parse --short HEAD, here> bash bench/gpu_check.sh",
#                    carry=[".whl"], timeout_s=540)    # the copy there may have no .git
#
# $OUT gets at most 8 files (the device tool's limit): gpu_check.log, progress.jsonl, table.md, <card>.csv
# and 4 plots. Each step has its own time limit, so one slow step cannot eat the others. Rows are written to
# $OUT/progress.jsonl as they are measured, so a step stopped at its limit still leaves its numbers.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
SET=${GPU_CHECK_SET:-gpu-headline}   # GPU_CHECK_SET=quick GPU_CHECK_ALLOW_CPU=1: dry run of the flow on a CPU
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
   && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to do. On CPU run: python -m bench"
  exit 0
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step SECONDS NAME CMD...: run CMD with a limit, output into the log
  local limit=$1 name=$2; shift 2
  log "== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$OUT/gpu_check.log" 2>&1
  local rc=$?
  log "== $name: exit $rc$( [ $rc -eq 124 ] && echo ' (time limit)')"
  return 0
}

# 0. Liger-Kernel (the baseline) from carried wheels: the machine has no network.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger_kernel'))" 2>&1 | tail -1
  git log -1 --oneline 2>/dev/null; } >>"$OUT/gpu_check.log" 2>&1
log "environment written"

# 1. GPU test tier.
step 150 "pytest -m gpu" python3 -m pytest -m gpu -q -s --maxfail=5 -p no:cacheprovider tests/  # -s: the fused-linear GPU test prints its timings

# 2. Headline benchmark: correctness check, copy bandwidth, every provider but compile.
step 210 "bench $SET" python3 -m bench --set "$SET" --results "$OUT" --jsonl "$OUT/progress.jsonl" \
  --markdown "$OUT/table.md" --provider eager --provider sdar-triton --provider sdar-torch --provider liger

# 3. torch.compile of eager at the two Qwen3 8k cases (compiles take ~20-40 s each).
[ "$SET" = gpu-headline ] && step 90 "bench compile" python3 -m bench --no-check --no-plots --results "$OUT" --jsonl "$OUT/progress.jsonl" \
  --provider eager --provider compile \
  --case 'sdar_loss:qwen3:N8k-V151936:bf16:official' --case 'linear_sdar_loss:qwen3:N8k-V151936-H4096:bf16:official'

# 4. The bound model's predictions (bench/model.py, from the committed sm_90a kernel report) next to the
#    measured sdar-triton rows of this run, for csrc_notes/perf.md.
step 30 "model vs measured" python3 -m bench.model --measured "$OUT/progress.jsonl"

log "done; files: $(ls "$OUT" | tr '\n' ' ')"

#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU (issues 24 and 28), from a fresh checkout:
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run] [--skip-tests] [--skip-build]
#
# 1. set-up: a Python with torch (PYTHON=..., else .venv/bin/python, else python3 if it has
#    torch, else scripts/setup.sh), the extension built in place for this GPU's arch;
# 2. the whole test suite with CUDA visible (every GPU test skipped on CPU runs here, among
#    them tests/test_gpu_sync.py: 100 GradScaler steps under set_sync_debug_mode("error"));
# 3. python -m ema_kernels bench --device cuda: fp32 AdamW + 1 EMA at 1M, 16M, 64M and 256M
#    parameters in 64 tensors, ek[cuda] and ek[triton] in both layouts, torch fused AdamW +
#    _foreach_lerp_, the torch.compile'd AdamW + _foreach_lerp_, the in-place stream and a
#    device-to-device copy; then bench --host (host µs per step() over the tensor-count sweep);
# 4. summary.md: the tables with % of the copy bandwidth and the speedups (scripts/gpu_summary.py).
#
# Everything lands in DIR (default: $OUT if set, else ./gpu_check_out), at most 8 files (what
# the device tool brings back): gpu_check.log (all output), tests.log, bench.json, bench.png,
# host.json, host.png, summary.md, env.txt. Each stage has a time limit so that the whole run
# ends within ~8 minutes on an H100 (the build of fused_cuda.cu for one arch takes most of the
# first stage); a stage that fails or runs out of time is recorded and the next one runs.
#
# --skip-tests / --skip-build: leave out the suite / the build (a second run on a warm machine;
# each stage's limits: build 240 s, tests 240 s, bench 180 s, host bench 90 s).
#
# --dry-run (no GPU needed): every stage that can run without a GPU runs -- the set-up check,
# the GPU tests' collection and their skip reasons, the same bench pipeline on the CPU at small
# sizes (cpp rows in place of cuda/triton, the compiled and copy rows included), the host
# bench, the summary -- and the GPU commands are printed as they would run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
SKIP_TESTS=0
SKIP_BUILD=0
DEST=${OUT:-$ROOT/gpu_check_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --out) DEST=$2; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
LOG=$DEST/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
FAILED=()

say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# stage NAME SECONDS CMD...: run with a time limit, output to the log; records failures.
stage() {
  local name=$1 limit=$2
  shift 2
  say "== $name (limit ${limit}s): $*"
  # STAGE_OUT=FILE: the stage's output also goes there
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "${STAGE_OUT:-/dev/null}" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  if [ $rc -ne 0 ]; then
    FAILED+=("$name(rc=$rc)")
    say "!! $name failed (rc=$rc$([ $rc -eq 124 ] && echo ', out of time'))"
  else
    say "ok $name"
  fi
  return $rc
}

# 1. Python and set-up ------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  elif python3 -c "import torch" >/dev/null 2>&1; then
    PY=python3
  else
    stage setup 900 bash scripts/setup.sh || { say "set-up failed"; exit 1; }
    PY=.venv/bin/python
  fi
fi
say "python: $PY; output: $DEST; dry run: $DRY"

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "host: $(uname -srm), $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
      --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  else
    echo "gpu: none (nvidia-smi not found)"
  fi
  "$PY" - <<'EOF'
import torch
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}); cuda available: "
      f"{torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
try:
    import triton
    print(f"triton: {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -n 1 | sed 's/^/nvcc: /'
} >"$DEST/env.txt" 2>&1
cat "$DEST/env.txt" | tee -a "$LOG"

HAVE_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$HAVE_GPU" != 1 ]; then
  say "no CUDA GPU visible to torch: nothing to check here (use --dry-run to rehearse)"
  exit 2
fi

# the extension, built in place for this GPU only (one arch: half the nvcc time)
if [ "$DRY" = 0 ] && [ "$SKIP_BUILD" = 0 ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  stage build 240 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    EMA_KERNELS_VERBOSE_PTXAS=1 "$PY" setup.py build_ext --inplace
elif [ "$DRY" = 0 ]; then
  say "--skip-build: using the extension already built here"
else
  say "dry run: would run: TORCH_CUDA_ARCH_LIST=<this GPU's arch> MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace"
  stage extension-present 60 "$PY" -c "from ema_kernels.backends import _extension as e; e.load_extension(); print('extension:', e.MAIN.info)"
fi
stage info 60 "$PY" -m ema_kernels info

# 2. the test suite ------------------------------------------------------------------------
if [ "$SKIP_TESTS" = 0 ]; then
  XDIST=()
  if "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
  fi
  : >"$DEST/tests.log"
  if [ "$DRY" = 0 ]; then
    STAGE_OUT=$DEST/tests.log stage tests 240 "$PY" -m pytest tests -q -rfEs \
      -p no:cacheprovider "${XDIST[@]}"
  else
    say "dry run: would run: $PY -m pytest tests -q -rfEs ${XDIST[*]}"
    stage tests-collect 300 "$PY" -m pytest tests -q --collect-only -p no:cacheprovider
    STAGE_OUT=$DEST/tests.log stage gpu-tests-skip 120 "$PY" -m pytest tests/test_gpu_sync.py \
      -q -rs -p no:cacheprovider
  fi
fi

# 3. benchmarks ----------------------------------------------------------------------------
BENCH=("$PY" -m ema_kernels bench --optimizer adamw --dtype fp32 --tensors 64)
if [ "$DRY" = 0 ]; then
  DEV=cuda
  SIZES=(1M 16M 64M 256M)
  # the ek rows of the backends that can run here (a failed build drops ek[cuda], not the bench)
  ROWS=()
  for b in $("$PY" -c "import ema_kernels as ek; print(*ek.available_backends('cuda'))"); do
    ROWS+=("ek[$b]" "ek[$b,flat]")
  done
  ROWS+=("torch fused + foreach_lerp" "torch.compile(foreach step + foreach_lerp)"
         "stream a+=b" "copy dst.copy_(src)")
  LIMIT=180
else
  DEV=cpu  # the same pipeline on the CPU: the kernels of the cpp backend stand in
  SIZES=(64K 1M)
  ROWS=("ek[cpp]" "ek[cpp,flat]" "torch fused + foreach_lerp"
        "torch.compile(foreach step + foreach_lerp)" "stream a+=b" "copy dst.copy_(src)")
  LIMIT=400
fi
PLOT=()
"$PY" -c "import matplotlib" >/dev/null 2>&1 && PLOT=(--plot "$DEST/bench.png")
stage bench "$LIMIT" "${BENCH[@]}" --device "$DEV" --numel "${SIZES[@]}" --rows "${ROWS[@]}" \
  --json "$DEST/bench.json" "${PLOT[@]}"
HPLOT=()
[ ${#PLOT[@]} -gt 0 ] && HPLOT=(--plot "$DEST/host.png")
HOSTN=()
[ "$DRY" = 1 ] && HOSTN=(--tensors 16 100 1000)  # the CPU's 10000-tensor row takes minutes
stage bench-host 90 "$PY" -m ema_kernels bench --host --device "$DEV" --json "$DEST/host.json" \
  "${HOSTN[@]}" "${HPLOT[@]}"

# 4. the summary ---------------------------------------------------------------------------
if [ -f "$DEST/bench.json" ]; then
  HOSTJ=()
  [ -f "$DEST/host.json" ] && HOSTJ=("$DEST/host.json")
  "$PY" scripts/gpu_summary.py "$DEST/bench.json" "${HOSTJ[@]}" --env "$DEST/env.txt" \
    >"$DEST/summary.md" 2>>"$LOG" || FAILED+=("summary")
fi
say "done in $(( $(date +%s) - T0 ))s; files: $(cd "$DEST" && ls | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "FAILED stages: ${FAILED[*]}"
  exit 1
fi
say "all stages passed"

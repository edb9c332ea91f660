#!/usr/bin/env bash
# GPU check for issue 11 (docs/performance.md, "On GPUs"). Run from the repository root on a
# machine with NVIDIA GPUs, after a CUDA torch is installed, e.g.
#   PPSTAGE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash .ci/setup
# It prints a short report and exits non-zero if a check failed. Budget: under 5 minutes.
#
#  1. the CUDA unit checks (pinned host copies, streams): tests/test_devices.py; the embedded
#     model on the GPU (weights and noise the same bytes as on the CPU): tests/test_model_device.py
#  2. equivalence K = 2, R0a, NCCL (needs 3 GPUs: rank 0 + 2 stages, one GPU each; NCCL
#     refuses two ranks of one communicator on one GPU), bitwise against the reference, which
#     runs its generator on the ranks' device (cuda:1)
#  3. the three benches with small sizes
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PPS=.venv/bin/ppstage
OUT=${OUT:-$(mktemp -d)}
REPORT="$OUT/gpu_report.txt"
status=0
say() { echo "$*" | tee -a "$REPORT"; }
run() {  # run <label> <timeout_s> <cmd...>: keeps the last lines of the output in the report
    local label=$1 limit=$2; shift 2
    local log="$OUT/$(echo "$label" | tr ' /' '__').log" t0=$SECONDS
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    say "== $label: exit $rc in $((SECONDS - t0)) s"
    tail -n 14 "$log" | tee -a "$REPORT"
    [ $rc -eq 0 ] || status=1
}

: >"$REPORT"
say "ppstage gpu_check $(date -u +%FT%TZ) on $(hostname)"
$PY - <<'PYEOF' 2>&1 | tee -a "$REPORT"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PYEOF
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then say "no GPU visible: nothing to check"; exit 1; fi

run "unit checks (tests/test_devices.py, tests/test_model_device.py)" 120 \
    $PY -m pytest -q tests/test_devices.py tests/test_model_device.py -p no:cacheprovider

if [ "$GPUS" -ge 3 ]; then
    cat >"$OUT/nccl.toml" <<'TOML'
[topology]
backend = "nccl"
[recompute]
mode = "r0a"
decoded_buffer_frames = 3
TOML
    run "equivalence K=2 R0a NCCL vs reference (bitwise)" 150 \
        $PPS demo --config "$OUT/nccl.toml" --stages 2 --chunks 12 --cut-at 8 --prompt-at "4:a grey wolf" \
        --out "$OUT/nccl_run"
else
    say "== equivalence K=2 R0a NCCL: SKIPPED, needs 3 GPUs (found $GPUS)"
fi

run "bench transport" 90 $PPS bench transport --sizes 4KiB 64KiB 1MiB 16MiB --rounds 3
run "bench pipeline" 120 $PPS bench pipeline --chunks 16
run "bench overlap" 150 $PPS bench overlap --chunks 12 --png "$OUT/overlap.png"
say "report: $REPORT   logs: $OUT"
exit $status

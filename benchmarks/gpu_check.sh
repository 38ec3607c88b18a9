#!/usr/bin/env bash
# The GPU check: one script, about 6 minutes on one H200 (sections 1-4 took 238 s on 2026-12-04), run
# whenever a GPU machine is lent.
#
#   benchmarks/gpu_check.sh prepare      # here, once: Tiny Shakespeare prepared into .gpu-check/data
#   benchmarks/gpu_check.sh [OUT_DIR]    # on the GPU machine, from the repository root
#
# The GPU machine has python3 with a CUDA build of torch, numpy, pandas, pyarrow, typer and rich, but
# not the data stage's Great Expectations, nor MLflow or Prefect: so the dataset is prepared where
# the project is installed (`prepare`) and travels with the checkout (the device tool's `carry`:
# .gpu-check), and the check itself runs the trainer, the evaluator and torchrun from the source tree.
#
# It reports, into OUT_DIR (default $OUT, else gpu-check-out) and on stdout:
#   1. throughput: training tokens/s of shakespeare-gpu (compiled, bf16) and its model FLOP utilisation
#      against a bf16 matrix product measured in the same run;
#   2. quality: shakespeare-gpu trained to its exact validation loss (sliding window and non-overlapping
#      windows), and the seconds at which the validation-subset loss first reached 1.47 nats/char;
#   3. DDP: one process under torchrun in an NCCL process group (DistributedDataParallel), its tokens/s;
#   4. sampling: characters/s generating with and without the KV cache;
#   5. quality again: the same training with its compiled code cached, as a second run on a machine sees it.
# GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 runs the same steps, tiny, on a CPU (tests/test_benchmarks.py).
set -uo pipefail  # no -e: a section that fails is reported and the next ones still run
cd "$(dirname "$0")/.."
DATA_ROOT=${GPU_CHECK_DATA:-.gpu-check}  # where `prepare` writes and the check reads the dataset
if [ "${1:-}" = prepare ]; then
    PY=${PYTHON:-.venv/bin/python}
    SOURCE=${SHAKESPEARE:-../shared/data/tinyshakespeare.txt}
    rm -rf "$DATA_ROOT"
    "$PY" - "$SOURCE" "$DATA_ROOT" <<'PYEOF'
import shutil, sys
from pathlib import Path
from fundamentallm.config import DataConfig
from fundamentallm.data.prepare import prepare

source, root = sys.argv[1], Path(sys.argv[2])
config = DataConfig.from_dict({
    "ingest": {"sources": [source]},
    "encode": {"split": "contiguous", "train_fraction": 0.9, "val_fraction": 0.1, "test_fraction": 0.0},
})
dataset = Path(prepare(config, root / "work", data_docs=False).dataset.path)
shutil.copytree(dataset, root / "data")
shutil.rmtree(root / "work")
print(f"prepared {root / 'data'}: name it in the device tool's carry ({root})")
PYEOF
    exit 0
fi

PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-gpu-check-out}}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SMOKE=${GPU_CHECK_SMOKE:-0}
DATA=$DATA_ROOT/data
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -f "$DATA/manifest.json" ] || { echo "no dataset in $DATA: run 'benchmarks/gpu_check.sh prepare' first" >&2; exit 2; }
# Only small files go to OUT_DIR (the device tool brings back at most 8): the run folders, with their
# checkpoints, go to WORK, and the quality run's metrics.jsonl is copied out for its curve.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SUMMARY=$OUT_DIR/summary.txt
ERRORS=$OUT_DIR/stderr.txt
: > "$ERRORS"
failed=()
# section N SECONDS COMMAND...: COMMAND's stdout to the summary, its stderr to stderr.txt; a failure or
# an overrun (exit 124) is written into the summary with the end of its stderr, and the check goes on.
section() {
    local n=$1 limit=$2 rc
    shift 2
    echo "### section $n" >> "$ERRORS"
    timeout --kill-after=10 "$limit" "$@" 2> >(tee -a "$ERRORS" | tail -c 20000 > "$WORK/last-stderr") | tee -a "$SUMMARY"
    rc=${PIPESTATUS[0]}
    wait
    if [ "$rc" != 0 ]; then
        failed+=("$n")
        { echo "section $n FAILED: exit $rc$([ "$rc" = 124 ] && echo ", over its $limit s")"; tail -n 15 "$WORK/last-stderr"; } | tee -a "$SUMMARY"
    fi
}

if [ "$SMOKE" = 1 ]; then  # the same steps, tiny: a check that the script runs, not a measurement
    PRESET=debug; TARGET=4.0; TRAIN_SET=(--set train.max_steps=30 --set train.device="$DEVICE")
    THROUGHPUT=(--presets debug --steps 2 --warmup 1); DDP_STEPS=20; GEN=(--tokens 16 --repeats 1)
    T_THROUGHPUT=300; T_QUALITY=300; T_DDP=300; T_GENERATION=300; T_AGAIN=300
else
    # shakespeare-gpu is 5,000 steps; the time budget only guards the 8 minutes.
    PRESET=shakespeare-gpu; TARGET=1.47; TRAIN_SET=(--set train.time_budget_s=240)
    THROUGHPUT=(--presets shakespeare-gpu --compile --steps 20); DDP_STEPS=300; GEN=()
    # Each section's limit (seconds), so that one that hangs leaves the others time to run.
    T_THROUGHPUT=90; T_QUALITY=300; T_DDP=90; T_GENERATION=45; T_AGAIN=200
fi
started=$(date +%s)
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} | tee "$SUMMARY"

echo "## 1. throughput" | tee -a "$SUMMARY"
section 1 "$T_THROUGHPUT" "$PY" benchmarks/bench_train.py throughput --device "$DEVICE" "${THROUGHPUT[@]}"

echo "## 2. quality: $PRESET to its exact validation loss, time to $TARGET" | tee -a "$SUMMARY"
section 2 "$T_QUALITY" "$PY" benchmarks/bench_train.py target --dataset "$DATA" --preset "$PRESET" --target "$TARGET" \
    --device "$DEVICE" --out "$WORK/run" --json "$OUT_DIR/quality.json" "${TRAIN_SET[@]}"
[ -f "$WORK/run/metrics.jsonl" ] && cp "$WORK/run/metrics.jsonl" "$OUT_DIR/quality-metrics.jsonl"

echo "## 3. DistributedDataParallel: one process under torchrun" | tee -a "$SUMMARY"
ddp() {
    "$PY" -c "
import json
from fundamentallm.presets import preset
c = preset('$PRESET')
c = c.replace(train=c.train.replace(max_steps=$DDP_STEPS, time_budget_s=0.0, eval_interval=$DDP_STEPS, device='$DEVICE'))
json.dump(c.to_dict(), open('$WORK/ddp-config.json', 'w'))
" || return
    NCCL_DEBUG=INFO "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 --max-restarts=0 \
        -m fundamentallm.launch --dataset "$DATA" --run-dir "$WORK/ddp" --config "$WORK/ddp-config.json" \
        > "$OUT_DIR/ddp.log" 2>&1 || { tail -n 30 "$OUT_DIR/ddp.log" >&2; return 1; }
    "$PY" - "$OUT_DIR/ddp.log" <<'PYEOF'
import json, re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
marker = "fundamentallm-train-result "
result = json.loads(next(line for line in text.splitlines() if line.startswith(marker))[len(marker):])
nccl = sum("NCCL INFO" in line for line in text.splitlines())
# The result's rate counts compilation; the last progress line's is the running rate.
windows = re.findall(r"\| ([\d,]+) tok/s \|", text)
running = f"{windows[-1]} tokens/s in its last progress window" if windows else "no progress line"
print(f"1 process, {result['device']}, {result['precision']}: {result['steps']} steps, "
      f"{result['tokens_per_s']:,.0f} tokens/s over all steps (compilation included), {running}; "
      f"NCCL log lines: {nccl} (0 on a CPU: gloo)")
PYEOF
}
export -f ddp; export PY PRESET DDP_STEPS DEVICE WORK DATA OUT_DIR
section 3 "$T_DDP" bash -c ddp

echo "## 4. sampling with and without the KV cache" | tee -a "$SUMMARY"
section 4 "$T_GENERATION" "$PY" benchmarks/bench_train.py generation --device "$DEVICE" "${GEN[@]}"
echo "## 5. quality again: the same training, its compiled code now in the cache (a second run's start-up)" | tee -a "$SUMMARY"
section 5 "$T_AGAIN" "$PY" benchmarks/bench_train.py target --dataset "$DATA" --preset "$PRESET" --target "$TARGET" \
    --device "$DEVICE" --out "$WORK/run-again" --json "$OUT_DIR/quality-again.json" "${TRAIN_SET[@]}"
echo "total $(( $(date +%s) - started )) s; failed sections: ${failed[*]:-none}" | tee -a "$SUMMARY"
[ ${#failed[@]} = 0 ]

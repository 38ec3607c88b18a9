#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H200, run whenever a GPU machine is lent.
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
#   4. sampling: characters/s generating with and without the KV cache.
# GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 runs the same steps, tiny, on a CPU (tests/test_benchmarks.py).
set -euo pipefail
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

if [ "$SMOKE" = 1 ]; then  # the same steps, tiny: a check that the script runs, not a measurement
    PRESET=debug; TARGET=4.0; TRAIN_SET=(--set train.max_steps=30 --set train.device="$DEVICE")
    THROUGHPUT=(--presets debug --steps 2 --warmup 1); DDP_STEPS=20; GEN=(--tokens 16 --repeats 1)
else
    # shakespeare-gpu is 5,000 steps; the time budget only guards the 8 minutes.
    PRESET=shakespeare-gpu; TARGET=1.47; TRAIN_SET=(--set train.time_budget_s=240)
    THROUGHPUT=(--presets shakespeare-gpu --compile --steps 20); DDP_STEPS=300; GEN=()
fi
started=$(date +%s)
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} | tee "$OUT_DIR/summary.txt"

echo "## 1. throughput" | tee -a "$OUT_DIR/summary.txt"
"$PY" benchmarks/bench_train.py throughput --device "$DEVICE" "${THROUGHPUT[@]}" | tee -a "$OUT_DIR/summary.txt"

echo "## 2. quality: $PRESET to its exact validation loss, time to $TARGET" | tee -a "$OUT_DIR/summary.txt"
rm -rf "$OUT_DIR/run"
"$PY" benchmarks/bench_train.py target --dataset "$DATA" --preset "$PRESET" --target "$TARGET" \
    --device "$DEVICE" --out "$OUT_DIR/run" --json "$OUT_DIR/quality.json" "${TRAIN_SET[@]}" | tee -a "$OUT_DIR/summary.txt"

echo "## 3. DistributedDataParallel: one process under torchrun" | tee -a "$OUT_DIR/summary.txt"
rm -rf "$OUT_DIR/ddp"
"$PY" -c "
import json, sys
from fundamentallm.presets import preset
c = preset('$PRESET')
c = c.replace(train=c.train.replace(max_steps=$DDP_STEPS, time_budget_s=0.0, eval_interval=$DDP_STEPS, device='$DEVICE'))
json.dump(c.to_dict(), open('$OUT_DIR/ddp-config.json', 'w'))
"
NCCL_DEBUG=INFO "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 --max-restarts=0 \
    -m fundamentallm.launch --dataset "$DATA" --run-dir "$OUT_DIR/ddp" --config "$OUT_DIR/ddp-config.json" \
    > "$OUT_DIR/ddp.log" 2>&1
"$PY" - "$OUT_DIR/ddp.log" <<'PYEOF' | tee -a "$OUT_DIR/summary.txt"
import json, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
marker = "fundamentallm-train-result "
result = json.loads(next(line for line in text.splitlines() if line.startswith(marker))[len(marker):])
nccl = sum("NCCL INFO" in line for line in text.splitlines())
print(f"1 process, {result['device']}, {result['precision']}: {result['steps']} steps, "
      f"{result['tokens_per_s']:,.0f} tokens/s; NCCL log lines: {nccl} (0 on a CPU: gloo)")
PYEOF

echo "## 4. sampling with and without the KV cache" | tee -a "$OUT_DIR/summary.txt"
"$PY" benchmarks/bench_train.py generation --device "$DEVICE" "${GEN[@]}" | tee -a "$OUT_DIR/summary.txt"
echo "total $(( $(date +%s) - started )) s" | tee -a "$OUT_DIR/summary.txt"
